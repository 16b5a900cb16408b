"""`trainer.losses.lean_cross_entropy` against PyTorch's own fp32 cross-entropy (value and gradients), across
row blocks, and its memory promise: no [tokens, vocab] tensor beyond the logits, whose storage holds the gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trainer import losses
from trainer.losses import lean_cross_entropy, plain_cross_entropy


def _head(dtype: torch.dtype, tokens: int = 300, vocab: int = 1000, width: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, width, generator=g).requires_grad_()
    w = (torch.randn(vocab, width, generator=g) * 0.5).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    return h, w, labels, dtype


def _loss_and_grads(ce, h, w, labels, dtype):
    loss = ce(F.linear(h.to(dtype), w.to(dtype)), labels)
    return loss, torch.autograd.grad(loss * 3.0, (h, w))  # a non-unit upstream gradient


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_bytes", [4 * 1000 * 7, 4 * 1000 * 300, 4 * 1000 * 10_000, 1])  # 7-row blocks,
def test_equals_pytorch_cross_entropy(dtype: torch.dtype, block_bytes: int, monkeypatch) -> None:  # one, one row
    monkeypatch.setattr(losses, "CE_BLOCK_BYTES", block_bytes)
    h, w, labels, dtype = _head(dtype)
    ours, our_grads = _loss_and_grads(lean_cross_entropy, h, w, labels, dtype)
    theirs, their_grads = _loss_and_grads(plain_cross_entropy, h, w, labels, dtype)
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: one rounding of each gradient element
    for a, b in zip(our_grads, their_grads):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item())


def test_a_wrong_gradient_is_caught() -> None:
    """The comparison above can fail: a gradient off by the label's one-hot is far outside its tolerance."""
    h, w, labels, dtype = _head(torch.float32)
    _, their_grads = _loss_and_grads(plain_cross_entropy, h, w, labels, dtype)
    _, softmax_only = _loss_and_grads(lambda x, y: torch.logsumexp(x.float(), -1).mean(), h, w, labels, dtype)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(softmax_only[0], their_grads[0], rtol=1e-5, atol=1e-5 * their_grads[0].abs().max().item())


def test_gradient_lives_in_the_logits_storage() -> None:
    h, w, labels, _ = _head(torch.float32)
    logits = F.linear(h, w)
    seen: list[torch.Tensor] = []
    logits.register_hook(seen.append)
    lean_cross_entropy(logits, labels).backward()
    assert seen[0].untyped_storage().data_ptr() == logits.untyped_storage().data_ptr()


def test_saves_only_the_logits_and_one_float_per_row() -> None:
    """What autograd keeps for backward: the logits, the labels and a log-sum-exp per row (PyTorch's keeps
    an fp32 log-softmax of the full size besides)."""
    h, w, labels, _ = _head(torch.bfloat16)
    logits = F.linear(h.detach().bfloat16(), w.detach().bfloat16()).requires_grad_()
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lean_cross_entropy(logits, labels)
    assert sum(saved.values()) == logits.nbytes + labels.nbytes + 4 * len(labels)


def test_an_op_that_saved_the_logits_fails_loudly() -> None:
    """The gradient overwrites the logits: anything else that kept them for its backward must not read it."""
    h, w, labels, _ = _head(torch.float32)
    logits = F.linear(h, w)
    kept = torch.tanh(logits).sum()  # tanh saves its output, not the logits: fine
    squared = (logits * logits).sum()  # mul saves the logits themselves
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (lean_cross_entropy(logits, labels) + 1e-3 * squared + kept).backward()


@pytest.mark.parametrize("bad", [-100, 1000])
def test_label_outside_the_vocabulary_fails(bad: int) -> None:
    labels = torch.tensor([1, 2, bad])
    with pytest.raises(RuntimeError, match="out of bounds"):
        lean_cross_entropy(torch.randn(3, 1000), labels)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_allocates_no_tensor_of_the_logits_size(dtype: torch.dtype) -> None:
    """Forward + backward of the loss alone allocate at most one work block (PyTorch's: several [T, V])."""
    from torch.profiler import ProfilerActivity, profile

    tokens, vocab = 512, 4096
    labels = torch.randint(0, vocab, (tokens,), generator=torch.Generator().manual_seed(0))

    def largest_allocation(ce) -> int:
        logits = torch.randn(tokens, vocab, dtype=dtype).requires_grad_()
        torch.autograd.grad(ce(logits, labels), logits)  # warm: the work block is kept from here on
        logits = torch.randn(tokens, vocab, dtype=dtype).requires_grad_()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            torch.autograd.grad(ce(logits, labels), logits)
        return max(e.cpu_memory_usage for e in prof.events())

    logits_bytes = tokens * vocab * torch.finfo(dtype).bits // 8
    assert largest_allocation(plain_cross_entropy) >= logits_bytes  # the check can see [T, V] tensors
    assert largest_allocation(lean_cross_entropy) < logits_bytes / 8
