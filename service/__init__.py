"""DiffusionGemma inference microservice."""

__version__ = "0.1.0"

from pathlib import Path as _Path

# The embedded default model (tools/tiny_model): what `dgemma serve` and `dgemma generate` use unless told.
DEFAULT_CHECKPOINT = _Path(__file__).parent / "assets" / "tiny-diffusiongemma"
