"""The base every schema model derives from: strict, immutable, documented."""

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Unknown keys are errors; instances are immutable (configs are data, not state)."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)
