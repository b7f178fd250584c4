"""Every registry the config refers to, keyed by the ModelConfig field that names an entry."""
from forge.models.block import BLOCK
from forge.models.init import EMBED_INIT
from forge.models.layers.attention import ATTENTION
from forge.models.layers.mlp import ACTIVATION, MLP_REGISTRY
from forge.models.layers.norm import NORM
from forge.models.layers.position import POSITION

REGISTRIES = {
    "attention": ATTENTION,
    "attention_pattern": ATTENTION,
    "position": POSITION,
    "norm": NORM,
    "norm_attn": NORM,
    "norm_mlp": NORM,
    "norm_post": NORM,
    "norm_final": NORM,
    "mlp": MLP_REGISTRY,
    "activation": ACTIVATION,
    "block": BLOCK,
    "embed_init": EMBED_INIT,
}
