"""Model loaders and model-family knowledge (shipped as `eqcompiler.models`)."""
from eqcompiler.models.loaders import LoadedModel, load_source, DEFAULT_MODEL_ALIAS  # noqa: F401
