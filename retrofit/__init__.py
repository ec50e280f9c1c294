"""retrofit-recurrence: shared code for turning pretrained decoder LMs into depth-recurrent models.

Kept import-light on purpose (data scripts import `retrofit.data.packing` without paying for
transformers). Importing `retrofit.model.modeling_raven` registers the recurrent model with
transformers' Auto classes, so `AutoModelForCausalLM.from_pretrained(dir)` works for our
checkpoints inside this repo even without `trust_remote_code`.
"""


def __getattr__(name):
    if name in ("RavenConfig", "RavenForCausalLM"):
        from .model import modeling_raven

        return getattr(modeling_raven, name)
    raise AttributeError(f"module 'retrofit' has no attribute {name!r}")
