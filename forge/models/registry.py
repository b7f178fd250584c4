"""Every registry the config refers to, keyed by the ModelConfig field that names an entry."""
from forge.models.block import BLOCK
from forge.models.init import EMBED_INIT
from forge.models.layers.attention import ATTENTION, QK_NORM
from forge.models.layers.mlp import ACTIVATION, MLP_REGISTRY
from forge.models.layers.norm import NORM
from forge.models.layers.position import POSITION
from forge.models.layers.scores import SCORE

REGISTRIES = {
    "attention": ATTENTION,
    "attention_pattern": ATTENTION,
    "attention_softmax": SCORE,
    "qk_norm": QK_NORM,
    "position": POSITION,
    "position_pattern": POSITION,
    "norm": NORM,
    "norm_attn": NORM,
    "norm_mlp": NORM,
    "norm_post": NORM,
    "norm_final": NORM,
    "attn_sub_norm": NORM,
    "mlp_sub_norm": NORM,
    "mlp": MLP_REGISTRY,
    "activation": ACTIVATION,
    "block": BLOCK,
    "embed_init": EMBED_INIT,
}
