"""Training stages, one module and one command each: tokenizer → pretrain → sft → dpo (→ reward, rl).

Every stage is a plain function taking one config dataclass (llmos/options.py): its fields are the command's
flags and the recipe's keys. llmos/train/loop.py holds what every stage shares (the options of a run, the
schedule, the end of a step, checkpoints and their resume, reports, distributed runs); llmos/train/finetune.py
the one fine-tuning loop of sft, dpo and reward, built from them as pretrain.py's loop is.
"""
