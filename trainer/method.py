"""The method's constants (METHOD.md), in one typed place shared by training, inference and export."""

from pydantic import BaseModel, ConfigDict, Field, model_validator


class MethodConfig(BaseModel):
    """Diffusion schedule and norm-guided inference constants."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    num_timesteps: int = Field(1000, gt=1, description="T, the number of diffusion steps")
    beta_start: float = Field(1e-4, gt=0, lt=1, description="first beta of the linear schedule")
    beta_end: float = Field(2e-2, gt=0, lt=1, description="last beta of the linear schedule")
    tau: int = Field(300, gt=0, description="splits small [0, tau) from big [tau, T) noise scales in training")
    t_s: int = Field(200, ge=0, description="small noise scale used at inference")
    t_b: int = Field(400, ge=0, description="big noise scale used at inference")
    guidance_w: float = Field(1.0, ge=0, description="norm-guidance weight w")
    top_k: int = Field(50, gt=0, description="image score = mean of the top-K anomaly-map pixels")
    noise_seed: int = Field(0, ge=0, description="seed of the fixed inference noise stored with the model")

    @model_validator(mode="after")
    def _check_scales(self) -> "MethodConfig":
        if not self.beta_start < self.beta_end:
            raise ValueError("beta_start must be below beta_end")
        if not 0 <= self.t_s < self.tau <= self.t_b < self.num_timesteps:
            raise ValueError("need 0 <= t_s < tau <= t_b < num_timesteps")
        return self
