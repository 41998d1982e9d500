"""The OpenAI-compatible server: protocol.py (the API's shapes), serving.py (the logic),
routes.py (HTTP only), app.py (assembly and `llmos serve`)."""
