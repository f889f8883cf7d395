"""The tunnel plugin (filled in by its own issue)."""

import pydantic

from sluice import hookimpl


class Config(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")


@hookimpl
def sluice_config_schema():
    return Config
