"""What each ATen op of a ``torch.export`` graph does to neuron spaces, heads included.

The exported graph is a small, stable vocabulary (``linear``, ``addmm``, ``conv2d``, ``embedding``,
``layer_norm``, ``scaled_dot_product_attention``, ``matmul``, ``view``, ``split`` ...) whose parameters
are ``get_attr`` nodes named as in the model's ``state_dict``. Besides :class:`~otfuse.discovery.walker.
Feature` (one axis of units) and ``None`` (nothing tracked), a value here may be:

* :class:`ParamView`: a parameter, possibly sliced, transposed or expanded, with the parameter axis
  behind each of its axes;
* :class:`Heads`: the units of one space laid out as ``(heads, dims)`` over two axes, after a view
  such as ``(B, T, H*d) -> (B, T, H, d)``; attention ops link the heads of q, k and v
  (:meth:`~otfuse.discovery.walker.SpaceBuilder.link_heads`);
* :class:`Chunks`: a packed projection viewed as ``(3, H, d)``: one part per chunk;
* a tuple of these (``split``, ``unbind``).

Every op not described here is accepted only when no tracked value or parameter flows into it;
otherwise it is an :class:`~otfuse.errors.UnsupportedOpError` naming the op, the node and the module.
"""

from __future__ import annotations

import operator

import torch
import torch.fx

from otfuse.discovery.aten_layers import (
    addmm,
    batch_norm,
    conv,
    conv_transpose,
    elementwise,
    embedding,
    group_norm,
    layer_norm,
    linear,
    nonlinearity,
    padding,
    pooling,
    pooling_with_indices,
    prelu,
    recurrent,
    recurrent_cell,
    reduction,
    unary,
    unpooling,
    vector_norm,
)
from otfuse.discovery.aten_shapes import (
    attention,
    concatenate,
    expand,
    getitem,
    index,
    matmul,
    no_units,
    permute,
    repeat,
    reshape,
    select,
    slice_,
    split,
    squeeze,
    stack,
    transpose,
    unbind,
    unsqueeze,
)
from otfuse.discovery.aten_values import (
    Rule,
    aten,
)


def _packets(names: str) -> list:
    """The ATen overload packets named (space-separated) that this torch has."""
    return [getattr(aten, n) for n in names.split() if hasattr(aten, n)]


ATEN_RULES: dict[object, Rule] = {
    **{p: linear for p in _packets("linear")},
    **{p: addmm for p in _packets("addmm")},
    **{p: matmul for p in _packets("matmul mm bmm")},
    **{p: conv for p in _packets("conv1d conv2d conv3d")},
    **{p: conv_transpose for p in _packets("conv_transpose1d conv_transpose2d conv_transpose3d")},
    **{p: embedding for p in _packets("embedding")},
    **{p: layer_norm for p in _packets("layer_norm rms_norm")},
    **{
        p: batch_norm
        for p in _packets("batch_norm _native_batch_norm_legit_no_training instance_norm")
    },
    **{p: prelu for p in _packets("prelu")},
    **{p: recurrent_cell for p in _packets("rnn_tanh_cell rnn_relu_cell gru_cell lstm_cell")},
    **{p: recurrent for p in _packets("lstm gru rnn_tanh rnn_relu")},
    **{p: group_norm for p in _packets("group_norm")},
    **{p: attention for p in _packets("scaled_dot_product_attention")},
    **{
        p: nonlinearity
        for p in _packets(
            "relu relu_ gelu silu tanh sigmoid elu leaky_relu hardswish mish softplus hardtanh "
            "relu6 gelu_ silu_ tanh_ sigmoid_ elu_ leaky_relu_ hardswish_ mish_ hardtanh_ "
            "selu selu_ celu celu_ hardsigmoid hardsigmoid_ log_sigmoid softshrink hardshrink "
            "threshold threshold_ rrelu rrelu_ rrelu_with_noise softsign"
        )
    },
    **{
        p: unary
        for p in _packets(
            "dropout alpha_dropout feature_alpha_dropout feature_dropout alias clone contiguous detach to _to_copy type_as lift_fresh_copy neg exp "
            "rsqrt sqrt abs cos sin erf log reciprocal square softmax _softmax log_softmax "
            "_log_softmax clamp clamp_min clamp_max neg_ exp_ rsqrt_ sqrt_ abs_ clamp_ "
            "clamp_min_ clamp_max_"
        )
    },
    **{
        p: pooling_with_indices
        for p in _packets(
            "max_pool1d_with_indices max_pool2d_with_indices max_pool3d_with_indices "
            "adaptive_max_pool1d adaptive_max_pool2d adaptive_max_pool3d"
        )
    },
    **{p: unpooling for p in _packets("max_unpool2d max_unpool3d")},
    **{
        p: pooling
        for p in _packets(
            "max_pool1d max_pool2d max_pool3d avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d "
            "adaptive_avg_pool2d adaptive_avg_pool3d "
            "upsample_nearest1d upsample_nearest2d upsample_nearest3d _upsample_nearest_exact1d "
            "_upsample_nearest_exact2d _upsample_nearest_exact3d upsample_linear1d "
            "upsample_bilinear2d _upsample_bilinear2d_aa upsample_bicubic2d upsample_trilinear3d"
        )
    },
    **{
        p: padding
        for p in _packets(
            "pad constant_pad_nd reflection_pad1d reflection_pad2d reflection_pad3d "
            "replication_pad1d replication_pad2d replication_pad3d"
        )
    },
    **{
        p: elementwise
        for p in _packets(
            "add sub rsub mul div pow where masked_fill maximum minimum eq ne lt le gt ge "
            "logical_and logical_or bitwise_and __and__ __or__ add_ sub_ mul_ div_ masked_fill_"
        )
    },
    **{p: reduction for p in _packets("mean sum amax amin var std logsumexp")},
    **{p: vector_norm for p in _packets("linalg_vector_norm")},
    **{p: transpose for p in _packets("transpose t numpy_T swapaxes")},
    **{p: permute for p in _packets("permute")},
    **{p: unsqueeze for p in _packets("unsqueeze")},
    **{p: squeeze for p in _packets("squeeze")},
    **{p: expand for p in _packets("expand")},
    **{p: repeat for p in _packets("repeat")},
    **{p: select for p in _packets("select")},
    **{p: unbind for p in _packets("unbind")},
    **{p: slice_ for p in _packets("slice")},
    **{p: split for p in _packets("split split_with_sizes chunk")},
    **{p: concatenate for p in _packets("cat concat")},
    **{p: stack for p in _packets("stack")},
    **{p: index for p in _packets("index")},
    **{p: reshape for p in _packets("view reshape _unsafe_view flatten unflatten")},
    **{
        p: no_units
        for p in _packets(
            "sym_size sym_numel sym_stride _assert_scalar sym_constrain_range_for_size "
            "_assert_tensor_metadata new_ones new_zeros new_full new_empty ones_like zeros_like "
            "empty_like full_like size"
        )
    },
    operator.getitem: getitem,
}


def aten_rule(node: torch.fx.Node) -> Rule | None:
    """The rule of an ATen op (by its overload packet), or of ``getitem``; None if unknown."""
    target = node.target
    packet = getattr(target, "overloadpacket", None)
    try:
        return ATEN_RULES.get(packet) if packet is not None else ATEN_RULES.get(target)
    except TypeError:
        return None
