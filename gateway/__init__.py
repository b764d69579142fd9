"""The OpenAI-compatible HTTP front door: `tidegate gateway` (gateway/app.py)."""
