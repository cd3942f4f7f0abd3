"""One module per group of endpoints, each with a `router`; app.py includes them all."""
