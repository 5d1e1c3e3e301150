"""Inference form of the early-prediction heads: batch norm folded into the linear layer.

A trained EP head is pooling -> batch norm -> linear (:mod:`impatient_ros.runtime.heads`).
In evaluation mode the batch norm is a fixed per-feature affine map, so it folds
into the linear layer exactly (up to float rounding)::

    W' = W * s,   b' = b + W @ (beta - mu * s),   s = gamma / sqrt(var + eps)

The average pooling is linear as well. Where the stage's feature map is small,
pooling and linear layer together become one matrix product on the flattened
feature map (the pooling's adjoint applied to W'); where pooling is the identity
(a 4x4 map into the 4x4 head) this is just W'. Otherwise the head keeps its
pooling and runs one matrix product after it. A grid that does not divide the
map (7x7 on 32x32 or 16x16) makes adaptive pooling average overlapping windows
of unequal size, a slow kernel; that pooling is separable (rows, then columns:
``A_h h A_w^T`` with the g x H and g x W window-averaging matrices), so such a
head pools the rows with one batched matrix product and folds the column
pooling into W' (``W' A_w``): two calls, neither of them the slow kernel, unless
the folded weight grows too much (many classes: ``SEPARABLE_MAX_EXTRA_WEIGHTS``).

Why: on a CPU a head of a small network costs about as much in per-operator
dispatch as in arithmetic (pool, flatten, batch norm, linear: four calls, about
50 us on this machine for smallcnn_tiny), which made t_A 1.16x the plain
forward. Fused, a head is one or two calls (9-24 us). See
``bench/bench_engine.py``.

The ``conv`` head (3x3 conv -> BN2d -> ReLU -> the avg4x4 head) folds twice:
its BN2d into the convolution (``W_c' = W_c * s`` per output channel, bias
``beta - mu * s``), exact for the same reason, and its avg4x4 tail as above on
the convolution's output shape. The ReLU between them stays, so the fused form
is conv (with bias) -> ReLU -> one or two calls: three or four operators
instead of seven.

Only for inference: the fused head has no batch-norm statistics to update and no
trainable parameters. Heads this module does not know (a torchvision classifier
used as the last exit) are left as they are.

The backbone blocks get the same folding (:func:`fuse_blocks`): every
convolution followed by a batch norm becomes one convolution with a bias, by
``torch.fx``'s conv-BN fusion over the block's traced graph, which also runs the
block as one flat function instead of nested module calls. The smallcnn block
(conv, BN, ReLU, conv, BN, ReLU) goes from six operator calls to four; torchvision
residual blocks fold the same way. In that flat function the convolutions, ReLUs
and max pools are then called as torch functions on the layers' own weights
(:func:`call_layers_as_functions`) rather than as modules: ``nn.Module.__call__``
(hook checks, the forward lookup) costs a few microseconds per layer, which a
network of about a millisecond shows (bench/results/engine_cpu.md). A block that
cannot be traced, or whose fused form does not give the same output, stays as it is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .heads import AvgGridHead, AvgHead, ConvHead, FCHead

# Pooling and linear layer merge into one matrix product when the dense matrix
# (C*H*W inputs x classes) has at most this many entries (256 KiB in float32):
# on this machine's CPU the single product was faster up to about there
# (smallcnn_tiny 64x8x8 -> 10 classes: 18 us fused vs 24 us pool + linear;
# 32x16x16: 26 us vs 20 us).
DENSE_MAX_ENTRIES = 65_536
# A grid that does not divide the map: the adaptive pool's overlapping windows are the slowest
# form at every such shape measured (bench/results/fused_uneven_heads.md). Its dense product
# still wins on small maps whatever the channels (8x8: 64 cells x 10 classes), the separable
# form (rows pooled by a product, columns folded into the linear layer) on larger ones (16x16,
# 32x32). For grids that divide the map the pool kernel was as fast as the separable form.
UNEVEN_DENSE_MAX_CELLS_X_CLASSES = 1_000
# The separable form's linear layer reads g x W columns per channel where the pooled one reads g x g, so it
# holds C * g * (W - g) * classes more weights, read on every call. With 10 classes that is at most about
# 1e5 and the separable form wins; with 1000 classes (resnet18's 256x14x14 and 512x7x7 maps at 224x224,
# 4x4 grid) it is millions, and the form took 2.0-3.6x the pooled one (bench/results/fused_uneven_heads.md).
SEPARABLE_MAX_EXTRA_WEIGHTS = 131_072


class FusedHead(nn.Module):
    """``[adaptive average pool | row pooling] -> flatten -> x @ weight_t + bias``; fixed weights, no batch norm.

    ``rows`` (g, H): the window-averaging matrix of a separable pooling's rows (module note); the
    weight then reads (C, g, W) features, the columns' pooling folded in.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, pool: int | None, kind: str,
                 rows: torch.Tensor | None = None) -> None:
        super().__init__()
        self.pool = pool
        self.kind = kind  # the head it replaced and how: "avg4x4 (dense)", "avg (pooled)", ...
        # Stored transposed and contiguous: addmm(bias, x (N, F), weight_t (F, classes)).
        self.register_buffer("weight_t", weight.t().contiguous())
        self.register_buffer("bias", bias.contiguous())
        self.register_buffer("rows", None if rows is None else rows.contiguous())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # h: (N, C, H, W) -> logits (N, num_classes)
        if self.rows is not None:
            h = torch.matmul(self.rows, h)  # (g, H) @ (N, C, H, W) -> (N, C, g, W)
        elif self.pool is not None:
            h = F.adaptive_avg_pool2d(h, self.pool)
        return torch.addmm(self.bias, h.flatten(1), self.weight_t)

    def extra_repr(self) -> str:
        return f"{self.kind}, in={self.weight_t.shape[0]}, classes={self.weight_t.shape[1]}"


class FusedConvHead(nn.Module):
    """``conv (batch norm folded in) -> ReLU -> FusedHead``: the inference form of a ConvHead."""

    def __init__(self, conv: nn.Conv2d, tail: FusedHead) -> None:
        super().__init__()
        self.conv = conv
        self.tail = tail
        self.kind = f"conv (folded) + {tail.kind}"

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # h: (N, C, H, W) -> relu(conv(h)) (N, width, H', W') -> logits (N, num_classes)
        return self.tail(torch.relu_(self.conv(h)))

    def extra_repr(self) -> str:
        return self.kind


def _folded_conv(conv: nn.Conv2d, norm: nn.modules.batchnorm._BatchNorm) -> nn.Conv2d:
    """The convolution equal to norm(conv(x)) in eval mode: each output channel scaled, a bias added."""
    var = norm.running_var.double()
    gamma = norm.weight.double() if norm.weight is not None else torch.ones_like(var)
    beta = norm.bias.double() if norm.bias is not None else torch.zeros_like(var)
    scale = gamma / torch.sqrt(var + norm.eps)
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(var)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                      padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=True,
                      padding_mode=conv.padding_mode)
    with torch.no_grad():
        fused.weight.copy_(conv.weight.double() * scale[:, None, None, None])
        fused.bias.copy_(beta + (bias - norm.running_mean.double()) * scale)
    return fused.requires_grad_(False)


def _conv_output_hw(conv: nn.Conv2d, hw: tuple[int, int]) -> tuple[int, int]:
    """(H', W') of ``conv`` on an (H, W) input (PyTorch's output-size formula)."""
    return tuple(  # type: ignore[return-value]
        (size + 2 * p - d * (k - 1) - 1) // s + 1
        for size, p, d, k, s in zip(hw, conv.padding, conv.dilation, conv.kernel_size, conv.stride))


def _fused_avg(norm: nn.modules.batchnorm._BatchNorm, fc: nn.Linear, grid: int, shape: tuple[int, int, int],
               dense_max_entries: int) -> FusedHead:
    """pool(grid) -> BN1d -> Linear on (C, H, W) maps as one FusedHead (identity pool, dense or pooled)."""
    c, hh, ww = shape
    w, b = _folded(norm, fc, 1)
    name = "avg" if grid == 1 else f"avg{grid}x{grid}"
    if (hh, ww) == (grid, grid):  # pooling is the identity
        return FusedHead(w, b, None, f"{name} (identity pool)")
    uneven = hh % grid != 0 or ww % grid != 0
    if (c * hh * ww * w.shape[0] <= dense_max_entries
            or (uneven and hh * ww * w.shape[0] <= UNEVEN_DENSE_MAX_CELLS_X_CLASSES)):
        return FusedHead(_dense_through_pool(w, grid, (c, hh, ww)), b, None, f"{name} (dense)")
    if uneven and c * grid * (ww - grid) * w.shape[0] <= SEPARABLE_MAX_EXTRA_WEIGHTS:
        # overlapping windows: pool the rows by a product, fold the columns into the weight
        return separable_head(w, b, grid, (c, hh, ww), f"{name} (separable)")
    return FusedHead(w, b, grid, f"{name} (pooled)")


def separable_head(weight: torch.Tensor, bias: torch.Tensor, grid: int, shape: tuple[int, int, int],
                   kind: str) -> FusedHead:
    """linear(flatten(adaptive_avg_pool(h, grid))) on (C, H, W) maps as row pooling + one product (module note)."""
    c, hh, ww = shape
    cols = window_averages(ww, grid)  # (g, W)
    w_rows = torch.einsum("kcij,jx->kcix", weight.reshape(weight.shape[0], c, grid, grid), cols).flatten(1)
    return FusedHead(w_rows, bias, None, kind, rows=window_averages(hh, grid))


def window_averages(size: int, grid: int) -> torch.Tensor:
    """(grid, size) float64: row i averages adaptive pooling's window i, [floor(i n / g), ceil((i + 1) n / g))."""
    out = torch.zeros(grid, size, dtype=torch.float64)
    for i in range(grid):
        start, end = (i * size) // grid, -(-((i + 1) * size) // grid)
        out[i, start:end] = 1.0 / (end - start)
    return out


def _folded(norm: nn.modules.batchnorm._BatchNorm, fc: nn.Linear, repeat: int) -> tuple[torch.Tensor, torch.Tensor]:
    """W', b' of linear(batchnorm(x)) for x whose features repeat each norm channel ``repeat`` times in a row."""
    var = norm.running_var.double()
    mean = norm.running_mean.double()
    gamma = norm.weight.double() if norm.weight is not None else torch.ones_like(var)
    beta = norm.bias.double() if norm.bias is not None else torch.zeros_like(var)
    scale = gamma / torch.sqrt(var + norm.eps)
    shift = beta - mean * scale
    if repeat > 1:  # BatchNorm2d before flattening (C, H, W): channel c covers H*W consecutive features
        scale, shift = scale.repeat_interleave(repeat), shift.repeat_interleave(repeat)
    w = fc.weight.double()
    b = fc.bias.double() if fc.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    return w * scale[None, :], b + w @ shift


def _dense_through_pool(weight: torch.Tensor, grid: int, shape: tuple[int, int, int]) -> torch.Tensor:
    """The matrix of linear(flatten(adaptive_avg_pool(h, grid))) on flatten(h): the pooling's adjoint applied to W'."""
    c, hh, ww = shape
    # Pooling is linear and acts on each sample alone, so the gradient of
    # sum_j <pool(h_j), W'_j> with respect to h_j is pool^T W'_j: row j of the dense matrix.
    with torch.enable_grad():
        h = torch.zeros(weight.shape[0], c, hh, ww, dtype=torch.float64, requires_grad=True)
        pooled = F.adaptive_avg_pool2d(h, grid).flatten(1)
        (grad,) = torch.autograd.grad((pooled * weight).sum(), h)
    return grad.flatten(1)


def fuse_head(head: nn.Module, feature_shape: tuple[int, int, int],
              dense_max_entries: int = DENSE_MAX_ENTRIES) -> nn.Module:
    """The inference form of ``head`` for stage outputs of shape (C, H, W); unknown heads come back unchanged.

    The head must be in evaluation mode (its batch-norm statistics are what gets folded).
    """
    if head.training:
        raise ValueError("fuse_head needs a head in evaluation mode (call .eval() first)")
    c, hh, ww = (int(v) for v in feature_shape)
    dtype, device = next(head.parameters()).dtype, next(head.parameters()).device
    if isinstance(head, FCHead):
        w, b = _folded(head.norm, head.fc, hh * ww)
        fused = FusedHead(w, b, None, "fc (folded)")
    elif isinstance(head, (AvgHead, AvgGridHead)):
        grid = 1 if isinstance(head, AvgHead) else head.grid
        fused = _fused_avg(head.norm, head.fc, grid, (c, hh, ww), dense_max_entries)
    elif isinstance(head, ConvHead):
        conv = _folded_conv(head.conv, head.conv_norm)
        tail = _fused_avg(head.norm, head.fc, ConvHead.GRID,
                          (conv.out_channels, *_conv_output_hw(conv, (hh, ww))), dense_max_entries)
        fused = FusedConvHead(conv, tail)
    else:
        return head
    return fused.to(device=device, dtype=dtype)


def fuse_heads(net: nn.Module) -> list[str]:
    """Replace every known EP head of an ImpatientNet (in eval mode) by its fused form; the kinds, per exit."""
    shapes = net.stage_output_shapes()
    kinds = []
    for k, head in enumerate(net.heads):
        if isinstance(head, FusedHead):
            kinds.append(head.kind)
            continue
        fused = fuse_head(head, shapes[k])
        net.heads[k] = fused
        kinds.append(getattr(fused, "kind", f"{type(head).__name__} (unchanged)"))
    return kinds


# Fused and original block must agree to this relative tolerance (float32 rounding of the folded weights).
BLOCK_CHECK_RTOL = 1e-4


def _batch_norms(module: nn.Module) -> int:
    """How many batch-norm layers ``module`` holds (before and after fusion tell what folded)."""
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def call_layers_as_functions(gm: torch.fx.GraphModule) -> int:
    """Rewrite ``gm``'s calls of Conv2d (zero padding), ReLU and MaxPool2d modules as torch function calls.

    The layers stay attributes of ``gm`` (their weights are read from them on every call,
    so ``.to()`` and state dicts work as before); only the module call around the
    arithmetic goes. Forward hooks on those inner layers no longer run (hooks on
    ``gm`` itself do). Other modules are left as calls. Returns how many calls it rewrote.
    """
    graph = gm.graph
    modules = dict(gm.named_modules())
    rewritten = 0
    for node in list(graph.nodes):
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        layer, (x,) = modules[node.target], node.args
        with graph.inserting_before(node):
            if type(layer) is nn.Conv2d and layer.padding_mode == "zeros":
                bias = graph.get_attr(f"{node.target}.bias") if layer.bias is not None else None
                new = graph.call_function(torch.conv2d, (x, graph.get_attr(f"{node.target}.weight"), bias,
                                                         layer.stride, layer.padding, layer.dilation, layer.groups))
            elif type(layer) is nn.ReLU:
                new = graph.call_function(torch.relu_ if layer.inplace else torch.relu, (x,))
            elif type(layer) is nn.MaxPool2d and not layer.return_indices:
                new = graph.call_function(torch.max_pool2d, (x, layer.kernel_size, layer.stride, layer.padding,
                                                             layer.dilation, layer.ceil_mode))
            else:
                continue
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        rewritten += 1
    if rewritten:
        graph.lint()
        gm.recompile()
    return rewritten


def fuse_block(block: nn.Module, input_shape: tuple[int, int, int]) -> tuple[nn.Module, str]:
    """The inference form of one backbone block in eval mode for inputs (C, H, W), and what was done.

    Falls back to the block itself (with the reason) when tracing fails, nothing folds, or the
    fused output differs from the block's on a random input.
    """
    if block.training:
        raise ValueError("fuse_block needs a block in evaluation mode (call .eval() first)")
    from torch.fx.experimental.optimization import fuse

    norms = _batch_norms(block)
    if norms == 0:
        return block, "unchanged (no batch norm)"
    try:
        fused = fuse(block, inplace=False)
    except Exception as exc:  # noqa: BLE001 - a data-dependent forward cannot be traced: keep it
        return block, f"unchanged (not traceable: {type(exc).__name__})"
    left = _batch_norms(fused)
    if left == norms:
        return block, "unchanged (no conv + batch norm pair)"
    as_functions = call_layers_as_functions(fused)
    param = next(block.parameters())
    x = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0)).to(param)
    with torch.no_grad():
        expected, got = block(x), fused(x)
    scale = expected.abs().max().clamp_min(1e-6)
    if got.shape != expected.shape or not bool(((got - expected).abs().max() / scale) <= BLOCK_CHECK_RTOL):
        return block, "unchanged (fused output differs)"
    what = f"{norms - left} of {norms} batch norms folded, {as_functions} layers as functions"
    return fused.requires_grad_(False), what


def fuse_blocks(net: nn.Module) -> list[str]:
    """Replace every backbone block of an ImpatientNet (in eval mode) by its fused form; what was done, per block."""
    shapes = [(net.config.in_channels, *net.config.input_size), *net.stage_output_shapes()]
    done = []
    for k, block in enumerate(net.blocks):
        fused, what = fuse_block(block, shapes[k])
        net.blocks[k] = fused
        done.append(what)
    return done
