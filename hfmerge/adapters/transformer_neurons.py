"""The neuron groups of a pre-norm transformer layer, which the ViT-like families declare alike.

A layer of such an encoder has an attention block whose heads are units (``q``, ``k``, ``v`` rows,
the output projection's input columns) and an MLP whose hidden neurons are units (the incoming
projections' rows, the outgoing one's input columns); around them runs the residual stream, which
every LayerNorm, the embeddings and the classifiers' input columns index. Families differ only in
the names of these modules and tensors, which their adapters pass in here: one declaration, so that
a fix to how a head or the stream is grouped reaches every family that has them.
"""

from __future__ import annotations

from collections.abc import Sequence

from hfmerge.adapters.neurons import GroupBuilder


def attention_heads(builder: GroupBuilder, attention: str, head_dim: int, *, output: str = "o_proj",
                    bias_table: str | None = None) -> None:
    """Declare the heads of the attention block ``attention`` as one group, each head a unit of ``head_dim``.

    A head is ``head_dim`` consecutive rows of ``q_proj``, ``k_proj`` and ``v_proj`` (and their biases)
    and as many input columns of ``output``. Heads move as wholes: queries and keys of one head must keep
    one order among themselves, since their dot product sums over it. They are observed at the q, k and v
    outputs. ``bias_table`` names a relative position bias table whose columns are the heads (one entry
    per head, added to its attention logits), which then moves with them.
    """
    projections = [f"{attention}.{p}_proj" for p in "qkv"]
    builder.produced_by(attention, *(f"{p}.{t}" for p in projections for t in ("weight", "bias")))
    builder.channels(attention, (f"{attention}.{output}.weight", 1), unit=head_dim, name=f"{attention} (heads)")
    if bias_table is not None:
        builder.channels(attention, (bias_table, 1), per_unit=True)
    builder.observed_at(attention, *projections, dim=-1)


def mlp_hidden(builder: GroupBuilder, mlp: str, *, incoming: Sequence[str] = ("fc1",),
               outgoing: Sequence[str] = ("fc2",)) -> None:
    """Declare the hidden neurons of the MLP ``mlp`` as one group.

    The ``incoming`` projections' rows and biases make the hidden neurons (several where they are
    multiplied together, as a gated MLP's gate and up projections are), the ``outgoing`` ones read them
    (input columns). They are observed at the incoming projections' outputs, before the activation.
    Names of projections the model lacks are skipped, so one declaration serves either kind of MLP.
    """
    builder.produced_by(mlp, *(f"{mlp}.{p}.{t}" for p in incoming for t in ("weight", "bias")))
    builder.channels(mlp, *((f"{mlp}.{p}.weight", 1) for p in outgoing), name=f"{mlp} (hidden)")
    builder.observed_at(mlp, *(f"{mlp}.{p}" for p in incoming), dim=-1)


def residual_stream(builder: GroupBuilder, *, name: str, embeddings: str, tokens: Sequence[str],
                    layers: Sequence[str], layer_scales: Sequence[str] = (), final_norms: Sequence[str],
                    readers: Sequence[str]) -> None:
    """Declare the residual stream (hidden size) as one optional group, from the patch embedding to the readers.

    LayerNorm normalises over the stream's channels in any order, so permuting all of them together keeps
    the function; the group is aligned only when asked. Its members: the patch embedding's projection
    (rows), the ``tokens`` of ``embeddings`` (learned tokens and position embeddings, on their last
    dimension), in each of ``layers`` both LayerNorms, the ``layer_scales`` (vectors that scale a block's
    output channel by channel), the q, k, v and ``fc1`` columns and the ``o_proj`` and ``fc2`` rows, then
    the ``final_norms`` and the input columns of the ``readers`` (the classifiers' weights). It is observed
    where it is written: the embeddings' output and every ``o_proj`` and ``fc2`` output. Tensors a model
    lacks are skipped.
    """
    stream = "residual"
    projection = f"{embeddings}.patch_embeddings.projection"
    builder.produced_by(stream, f"{projection}.weight", f"{projection}.bias")
    builder.channels(stream, *((f"{embeddings}.{token}", 2) for token in tokens), name=name, optional=True)
    builder.observed_at(stream, embeddings, dim=-1)
    for layer in layers:
        attention, mlp = f"{layer}.attention", f"{layer}.mlp"
        for norm in ("layernorm_before", "layernorm_after"):
            builder.channels(stream, (f"{layer}.{norm}.weight", 0), (f"{layer}.{norm}.bias", 0))
        builder.channels(stream, *((f"{layer}.{scale}", 0) for scale in layer_scales))
        builder.channels(stream, *((f"{attention}.{p}_proj.weight", 1) for p in "qkv"), (f"{mlp}.fc1.weight", 1))
        builder.produced_by(stream, f"{attention}.o_proj.weight", f"{attention}.o_proj.bias",
                            f"{mlp}.fc2.weight", f"{mlp}.fc2.bias")
        builder.observed_at(stream, f"{attention}.o_proj", f"{mlp}.fc2", dim=-1)
    builder.channels(stream, *((f"{norm}.{t}", 0) for norm in final_norms for t in ("weight", "bias")),
                     *((reader, 1) for reader in readers))
