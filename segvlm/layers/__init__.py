"""Building blocks of the SegVLM decoder, one concept per module (timm ``layers/`` style)."""

from segvlm.layers.convex_upsample import ConvexUpsample, bilinear_corner_weights
from segvlm.layers.create_act import QuickGELU, create_act, get_act_layer
from segvlm.layers.create_norm import LayerNorm2d, create_norm, get_norm_layer, group_count
from segvlm.layers.cross_attention import GatedCrossAttention, sincos_1d, sincos_2d
from segvlm.layers.deform_conv import LanguageConditionedDeformConv2d, deform_conv2d, deform_conv2d_native
from segvlm.layers.film import FiLM, film
from segvlm.layers.projector import TextImageProjector
from segvlm.layers.refinement import LayerScale2d, ResidualRefinementBlock
from segvlm.layers.relational_context import RelationalContext, directional_maps
from segvlm.layers.relative_position import RelativePositionBias
from segvlm.layers.squeeze_excite import SqueezeExcite
from segvlm.layers.word_head import WordHead

__all__ = [
    "ConvexUpsample",
    "FiLM",
    "GatedCrossAttention",
    "LanguageConditionedDeformConv2d",
    "LayerNorm2d",
    "LayerScale2d",
    "QuickGELU",
    "RelationalContext",
    "RelativePositionBias",
    "ResidualRefinementBlock",
    "SqueezeExcite",
    "TextImageProjector",
    "WordHead",
    "bilinear_corner_weights",
    "create_act",
    "create_norm",
    "deform_conv2d",
    "deform_conv2d_native",
    "directional_maps",
    "film",
    "get_act_layer",
    "get_norm_layer",
    "group_count",
    "sincos_1d",
    "sincos_2d",
]
