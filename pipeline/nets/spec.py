"""The typed description of a velocity network; the params schema reuses it verbatim."""

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class NetSpec(BaseModel):
    """Architecture of one velocity net v(x, t, label); `build_net` turns it into a module.

    `width`/`depth` shape the MLPs (hidden width, hidden layers or residual blocks); `channels` gives the
    UNet's channels per resolution level (each level halves the resolution). `emb_dim` is the size of the
    (t, label) embedding, `dropout` the drop rate inside blocks. `unet2d` (diffusers' UNet2DModel, the
    DDPM++/ADM family) reads `channels`, `depth` as residual blocks per level, `attention` as the
    resolutions (image sides) that get self-attention, `emb_dim` and `dropout`.
    """

    model_config = ConfigDict(extra="forbid")

    kind: Literal["mlp", "resmlp", "unet", "unet2d"]
    width: int = Field(256, ge=8)
    depth: int = Field(3, ge=1, le=32)
    channels: list[Annotated[int, Field(ge=4)]] = Field(
        default_factory=lambda: [32, 64], min_length=1, max_length=5
    )
    emb_dim: int = Field(64, ge=4)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    attention: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [16], description="unet2d only")
