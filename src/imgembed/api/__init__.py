"""The HTTP service (`imgembed serve`): a FastAPI app over the library's engine."""

from imgembed.api.app import app_from_env, create_app

__all__ = ["app_from_env", "create_app"]
