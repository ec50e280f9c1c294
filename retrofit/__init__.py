"""retrofit-recurrence: shared code for turning pretrained decoder LMs into depth-recurrent models.

Importing the package registers the recurrent model with transformers' Auto classes, so
`AutoModelForCausalLM.from_pretrained(dir)` works for our checkpoints inside this repo even
without `trust_remote_code` (outside it, the copied modeling file is used).
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_raven import RavenConfig
from .modeling_raven import RavenForCausalLM

AutoConfig.register(RavenConfig.model_type, RavenConfig, exist_ok=True)
AutoModelForCausalLM.register(RavenConfig, RavenForCausalLM, exist_ok=True)

__all__ = ["RavenConfig", "RavenForCausalLM"]
