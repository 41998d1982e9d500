"""The OpenAI-compatible server: protocol.py (the API's shapes), serving.py (the logic),
routes.py (HTTP only), app.py (assembly and `llmos serve`), store.py (what persists, in
SQLite under LLMOS_HOME) and ui/ (the chat page: static files, no build step)."""
