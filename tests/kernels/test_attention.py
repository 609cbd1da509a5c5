"""Triton flash attention against the float64 PyTorch reference.

On CPU the kernels run under TRITON_INTERPRET=1 in fp32 with tiny shapes (bf16 under autocast: test_autocast.py);
the GPU-sized bf16/fp16 accuracy checks need a GPU. Inputs are fresh random draws every run; each
failure message carries the seed that reproduces it.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import subprocess

import pytest
import torch

if not torch.cuda.is_available():
    # Before any kernel launch; the kernel module reads the flag when it builds the kernels.
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kmodel import kernels  # noqa: E402
from kmodel.kernels.attention import compile_report, reference, triton_impl, triton_kernels  # noqa: E402
from kmodel.safe_path import python_command  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _fresh_generator() -> tuple[torch.Generator, int]:
    seed = int.from_bytes(os.urandom(4), "little")
    return torch.Generator().manual_seed(seed), seed


def _random_inputs(gen, batch, seq, q_heads, kv_heads, head_dim, dtype=torch.float32, v_dim=None):
    """q, k, v, grad_out; v and the output (so grad_out) have v_dim, by default head_dim."""

    def draw(heads, dim):
        return torch.randn(batch, seq, heads, dim, generator=gen).to(DEVICE, dtype)

    v_dim = v_dim or head_dim
    return draw(q_heads, head_dim), draw(kv_heads, head_dim), draw(kv_heads, v_dim), draw(q_heads, v_dim)


def _random_cu_seqlens(gen, total: int, docs: int) -> torch.Tensor:
    """Boundaries anywhere in the flattened tokens: documents may span rows, repeats make empty documents."""
    cuts = torch.randint(1, max(total, 2), (docs - 1,), generator=gen).clamp(max=total)
    return torch.cat([torch.tensor([0]), cuts.sort().values, torch.tensor([total])]).to(DEVICE)


NAMES = ("out", "dq", "dk", "dv", "dsinks")


def _random_sinks(gen, q_heads, dtype=torch.float32):
    return (2 * torch.randn(q_heads, generator=gen)).to(DEVICE, dtype)


def _run(impl, q, k, v, grad_out, sinks=None, **kw):
    """Output and (dq, dk, dv[, dsinks]) of impl.attention at the inputs' dtype."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v) if t is not None]
    if sinks is not None:
        leaves.append(sinks.detach().clone().requires_grad_())
        kw["sinks"] = leaves[-1]
    out = impl.attention(*leaves[:3], **kw)
    out.backward(grad_out)
    return (out.detach(), *(t.grad for t in leaves))


def _reference64(q, k, v, grad_out, sinks=None, **kw):
    sinks = None if sinks is None else sinks.double()
    return _run(reference, *(t.double() for t in (q, k, v, grad_out)), sinks=sinks, **kw)


def _assert_matches_reference(q, k, v, grad_out, seed, atol=2e-5, rtol=1e-4, **kw):
    got = _run(triton_impl, q, k, v, grad_out, **kw)
    want = _reference64(q, k, v, grad_out, **kw)
    assert len(got) == len(want) == 4 + (kw.get("sinks") is not None)
    for name, g, w in zip(NAMES, got, want):
        assert g.dtype == (q.dtype if name != "dsinks" else kw["sinks"].dtype), name
        torch.testing.assert_close(
            g.double(), w, atol=atol, rtol=rtol, msg=lambda m, name=name: f"{name} (seed {seed}, {kw}): {m}"
        )


# (batch, seq, q_heads, kv_heads, head_dim, window, causal, docs, sinks): odd lengths throughout; "rand"
# draws a window in [1, seq + 4]; docs is the number of documents packed over the batch (0 = no cu_seqlens).
CASES = [
    (1, 40, 2, 2, 16, None, True, 0, False),
    (2, 53, 4, 2, 32, "rand", True, 0, False),
    (1, 37, 4, 1, 16, 1, True, 0, False),  # W = 1: every query sees only itself
    (1, 45, 2, 1, 16, 45, True, 0, False),  # W = seq: as global
    (1, 29, 2, 1, 16, 100, True, 0, False),  # W > seq
    (1, 70, 2, 2, 24, "rand", False, 0, False),  # two-sided window; head_dim padded to 32
    (2, 50, 2, 1, 16, None, False, 0, False),
    (2, 45, 4, 2, 16, "rand", True, 4, False),
    (2, 61, 2, 1, 16, None, True, 5, False),
    (1, 66, 3, 1, 16, 20, False, 3, False),  # GQA 3:1, non-causal with documents
    (1, 1, 2, 1, 16, 1, True, 0, False),
    (1, 33, 2, 1, 64, "rand", True, 2, False),
    (2, 41, 4, 2, 16, None, True, 0, True),  # attention sinks
    (1, 50, 2, 1, 16, "rand", True, 3, True),
    (1, 35, 2, 2, 16, 9, False, 0, True),
]


@pytest.mark.parametrize("batch,seq,q_heads,kv_heads,head_dim,window,causal,docs,sinks", CASES)
def test_matches_reference(batch, seq, q_heads, kv_heads, head_dim, window, causal, docs, sinks):
    gen, seed = _fresh_generator()
    if window == "rand":
        window = int(torch.randint(1, seq + 5, (), generator=gen))
    q, k, v, grad_out = _random_inputs(gen, batch, seq, q_heads, kv_heads, head_dim)
    cu_seqlens = _random_cu_seqlens(gen, batch * seq, docs) if docs else None
    sinks = _random_sinks(gen, q_heads) if sinks else None
    _assert_matches_reference(
        q, k, v, grad_out, seed, window=window, causal=causal, cu_seqlens=cu_seqlens, sinks=sinks
    )


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("cu_seqlens", [[0, 63, 193, 256], [0, 65, 128, 191, 256]])
def test_document_ends_next_to_block_edges(causal, cu_seqlens):
    """Documents ending one before / after a block edge (blocks are powers of two >= 16): an off-by-one in
    which blocks count as wholly visible would leak a token across the boundary. Two rows of 128."""
    gen, seed = _fresh_generator()
    q, k, v, grad_out = _random_inputs(gen, 2, 128, 2, 1, 16)
    cu = torch.tensor(cu_seqlens, device=DEVICE)
    _assert_matches_reference(q, k, v, grad_out, seed, causal=causal, cu_seqlens=cu)


@pytest.mark.parametrize("head_dim,v_dim,window,docs,sinks", [(24, 16, None, 0, False), (16, 40, 11, 3, True)])
def test_value_head_dim_differs_from_query_key(head_dim, v_dim, window, docs, sinks):
    """As in MLA (q/k 192, v 128): v and the output have their own head dim, padded on its own."""
    gen, seed = _fresh_generator()
    q, k, v, grad_out = _random_inputs(gen, 2, 37, 4, 2, head_dim, v_dim=v_dim)
    cu_seqlens = _random_cu_seqlens(gen, 2 * 37, docs) if docs else None
    sinks = _random_sinks(gen, 4) if sinks else None
    _assert_matches_reference(q, k, v, grad_out, seed, window=window, cu_seqlens=cu_seqlens, sinks=sinks)


class _LaunchSpy:
    """Stands in for a kernel module attribute: records each launch's keyword arguments (its constexprs)."""

    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(kwargs)
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.mark.parametrize(
    "head_dim,v_dim,pieces,window,causal,docs,sinks",
    [
        (192, 128, (128, 64), 17, True, 3, True),  # MLA: q/k 128 nope + 64 rope, v 128
        (192, 128, (128, 64), None, False, 0, False),
        (48, 16, (32, 16), 9, False, 2, True),
    ],
)
def test_query_key_dim_of_two_powers_splits_instead_of_padding(
    head_dim, v_dim, pieces, window, causal, docs, sinks, monkeypatch
):
    """MLA's q/k 192 computes as 128 + 64 (two dots per product), not padded to 256: every kernel the forward,
    backward and decode launch gets those pieces as constexprs, and all results equal the float64 reference
    (GQA 2:1; windows, documents and sinks as parametrized)."""
    launches = []
    for name in ("attention_fwd_kernel", "attention_bwd_dkdv_kernel", "attention_bwd_dq_kernel",
                 "attention_decode_kernel"):  # fmt: skip
        monkeypatch.setattr(triton_kernels, name, _LaunchSpy(getattr(triton_kernels, name), launches))
    gen, seed = _fresh_generator()
    q, k, v, grad_out = _random_inputs(gen, 1, 40, 2, 1, head_dim, v_dim=v_dim)
    cu_seqlens = _random_cu_seqlens(gen, 40, docs) if docs else None
    sinks = _random_sinks(gen, 2) if sinks else None
    _assert_matches_reference(
        q, k, v, grad_out, seed, window=window, causal=causal, cu_seqlens=cu_seqlens, sinks=sinks
    )
    new, cache_lens = 2, [40, 23]
    q_full, k, v, q, k_cache, v_cache = _decode_case(gen, cache_lens, new, 2, 1, head_dim, 40, v_dim=v_dim)
    kw = dict(window=window, sinks=sinks)
    got = triton_impl.decode_attention(q, k_cache, v_cache, cache_lens=torch.tensor(cache_lens, device=DEVICE), **kw)
    want = _decode_reference(q_full, k, v, cache_lens, new, **kw)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-4, msg=lambda m: f"decode, seed {seed}: {m}")
    assert len(launches) == 4
    for constants in launches:
        assert (constants["HEAD_DIM"], constants["HEAD_DIM_2"], constants["EVEN_D"]) == (*pieces, True), constants
        assert constants["V_DIM"] == v_dim


def test_query_key_pieces():
    """Only a sum of two powers of two of at least 16 splits; anything else pads to one power of two. MLA's
    split has its own forward / dQ lists with wider key blocks than at 256 (which spill there) and shares
    the dK/dV list of (256, 128)."""
    pieces = {dim: triton_impl.qk_pieces(dim) for dim in (16, 24, 40, 48, 64, 96, 144, 160, 192, 200, 256)}
    assert pieces == {
        16: (16, 0), 24: (32, 0), 40: (64, 0), 48: (32, 16), 64: (64, 0), 96: (64, 32), 144: (128, 16),
        160: (128, 32), 192: (128, 64), 200: (256, 0), 256: (256, 0),
    }  # fmt: skip
    assert triton_impl.computed_head_dims(192, 128) == (192, 128)
    def widest_key_block(name, head_dim):
        return max(n for _, n, *_ in triton_impl.cuda_configs(name, head_dim, 128))

    assert widest_key_block("attention_fwd_kernel", 192) > widest_key_block("attention_fwd_kernel", 256)
    assert widest_key_block("attention_bwd_dq_kernel", 192) > widest_key_block("attention_bwd_dq_kernel", 256)
    dkdv = "attention_bwd_dkdv_kernel"
    assert triton_impl.cuda_configs(dkdv, 192, 128) == triton_impl.cuda_configs(dkdv, 256, 128)


@settings(max_examples=6, deadline=None, derandomize=False)
@given(
    batch=st.integers(1, 2),
    seq=st.integers(1, 80),
    kv_heads=st.integers(1, 2),
    group=st.integers(1, 3),
    window=st.one_of(st.none(), st.integers(1, 90)),
    causal=st.booleans(),
    docs=st.integers(0, 4),
    scale=st.one_of(st.none(), st.floats(0.05, 0.5)),
    sinks=st.booleans(),
)
def test_random_configurations(batch, seq, kv_heads, group, window, causal, docs, scale, sinks):
    gen, seed = _fresh_generator()
    q, k, v, grad_out = _random_inputs(gen, batch, seq, kv_heads * group, kv_heads, 16)
    cu_seqlens = _random_cu_seqlens(gen, batch * seq, docs) if docs else None
    sinks = _random_sinks(gen, kv_heads * group) if sinks else None
    _assert_matches_reference(
        q, k, v, grad_out, seed, window=window, causal=causal, scale=scale, cu_seqlens=cu_seqlens, sinks=sinks
    )


def _dense_mask(batch, seq, window, causal, cu_seqlens):
    """(batch, 1, seq, seq) visibility from the reference's own helpers."""
    positions = torch.arange(seq, device=DEVICE)
    mask = reference.visibility_mask(positions, positions, window=window, causal=causal).expand(batch, 1, seq, seq)
    if cu_seqlens is not None:
        doc = reference.document_ids(cu_seqlens, batch, seq)
        mask = mask & (doc[:, None, :, None] == doc[:, None, None, :])
    return mask


@pytest.mark.parametrize("with_sinks", [False, True])
def test_every_element_written_and_lse_saved(with_sinks):
    """Outputs and gradients start as NaN: every element must be overwritten, and the saved log-sum-exp
    must be the float64 logsumexp of the visible scaled scores (and the sink)."""
    gen, seed = _fresh_generator()
    batch, seq, q_heads, kv_heads, head_dim, window, scale = 2, 57, 4, 2, 24, 13, 0.3
    q, k, v, grad_out = _random_inputs(gen, batch, seq, q_heads, kv_heads, head_dim)
    cu_seqlens = _random_cu_seqlens(gen, batch * seq, 4)
    sinks = _random_sinks(gen, q_heads) if with_sinks else None
    kw = dict(window=window, causal=True, scale=scale, sinks=sinks)
    bounds = triton_impl.document_bounds(cu_seqlens, batch, seq)

    def poisoned(shape):
        return torch.full(shape, float("nan"), device=DEVICE)

    out, lse = poisoned(q.shape), poisoned((batch, q_heads, seq))
    triton_impl.attention_forward(q, k, v, out, lse, doc_bounds=bounds, **kw)
    grads = poisoned(q.shape), poisoned(k.shape), poisoned(v.shape)
    grad_sinks = poisoned((q_heads,)) if with_sinks else None
    triton_impl.attention_backward(
        grad_out, q, k, v, out, lse, *grads, doc_bounds=bounds, grad_sinks=grad_sinks, **kw
    )

    want = _reference64(q, k, v, grad_out, cu_seqlens=cu_seqlens, **kw)
    got = (out, *grads) + ((grad_sinks,) if with_sinks else ())
    assert len(got) == len(want)
    for name, g, w in zip(NAMES, got, want):
        torch.testing.assert_close(g.double(), w, atol=2e-5, rtol=1e-4, msg=lambda m, n=name: f"{n} (seed {seed}): {m}")

    # Query head h reads kv head h // group.
    keys = k.double().transpose(1, 2).repeat_interleave(q_heads // kv_heads, dim=1)
    scores = (q.double().transpose(1, 2) @ keys.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~_dense_mask(batch, seq, window, True, cu_seqlens), float("-inf"))
    if with_sinks:
        scores = torch.cat((scores, sinks.double()[None, :, None, None].expand(batch, -1, seq, 1)), dim=-1)
    torch.testing.assert_close(lse.double(), scores.logsumexp(-1), atol=1e-5, rtol=1e-5, msg=f"lse (seed {seed})")


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")
@pytest.mark.parametrize("causal", [True, False])
def test_invisible_blocks_are_never_loaded(causal):
    """A NaN at one position spreads to every tile that loads it, masked or not: rows whose block cannot
    reach that position must stay finite in the output and in all three gradients."""
    gen, seed = _fresh_generator()
    interpreted = triton_impl.interpreting()
    # Rows near the visible band may share a block with a row that sees the poison; farther ones may not.
    margin = sum(triton_impl.INTERPRETER_BLOCKS["attention_fwd_kernel"]) + 16 if interpreted else 2 * 128 + 16
    seq, window = (256, 16) if interpreted else (1024, 64)
    q, k, v, grad_out = _random_inputs(gen, 1, seq, 2, 1, 16)
    poison = seq // 2
    for t in (q, k, v):
        t[:, poison] = float("nan")
    out, dq, dk, dv = _run(triton_impl, q, k, v, grad_out, window=window, causal=causal)
    far = (torch.arange(seq, device=DEVICE) - poison).abs() >= window + margin
    assert far.sum() > seq // 4
    for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert t[:, far].isfinite().all(), f"{name}: a block beyond the window was loaded (seed {seed})"
    assert out[:, poison : poison + window].isnan().all(), "the poisoned key should reach the rows that see it"


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")
def test_documents_never_load_each_other():
    """Non-causal attention over two documents split at a block boundary (128 divides every block size):
    poison anywhere in the first must not reach the second, forward or backward."""
    gen, seed = _fresh_generator()
    seq, boundary = 256, 128
    q, k, v, grad_out = _random_inputs(gen, 1, seq, 2, 2, 16)
    for t in (q, k, v):
        t[:, int(torch.randint(0, boundary, (), generator=gen))] = float("nan")
    cu_seqlens = torch.tensor([0, boundary, seq], device=DEVICE)
    out, dq, dk, dv = _run(triton_impl, q, k, v, grad_out, causal=False, cu_seqlens=cu_seqlens)
    for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert t[:, boundary:].isfinite().all(), f"{name}: a block of the other document was loaded (seed {seed})"
    assert out[:, :boundary].isnan().all()


def test_strided_inputs_and_gradients():
    """q, k, v as views of one fused projection, and a non-contiguous output gradient."""
    gen, seed = _fresh_generator()
    batch, seq, q_heads, kv_heads, head_dim = 2, 35, 4, 2, 16
    fused = torch.randn(batch, seq, q_heads + 2 * kv_heads, head_dim, generator=gen).to(DEVICE)
    q, k, v = fused.split([q_heads, kv_heads, kv_heads], dim=2)
    assert not q.is_contiguous()
    grad_out = torch.randn(batch, q_heads, seq, head_dim, generator=gen).to(DEVICE).transpose(1, 2)
    _assert_matches_reference(q, k, v, grad_out, seed, window=9)


def test_same_signature_as_reference_and_loadable():
    assert kernels.load("attention", "triton") is triton_impl
    assert inspect.signature(triton_impl.attention) == inspect.signature(reference.attention)


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter mode only")
def test_interpreter_flag_is_read_at_launch(monkeypatch):
    """Kernels (and their helpers) built while TRITON_INTERPRET was unset are built again for the interpreter
    once it is set, as when another test module imported triton (or these kernels) first."""
    import triton

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    compiled = triton_kernels.attention_fwd_kernel.jit_function()
    assert isinstance(compiled, triton.runtime.JITFunction)
    assert isinstance(compiled.fn.__globals__["_fwd_blocks"], triton.runtime.JITFunction)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    gen, seed = _fresh_generator()
    _assert_matches_reference(*_random_inputs(gen, 1, 20, 2, 1, 16), seed, window=5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter mode only")
def test_runs_when_triton_was_imported_before_the_flag():
    """Triton decorates its own library (tl.zeros, tl.max, ...) at `import triton`: a process that imported
    triton before setting TRITON_INTERPRET=1 must still run the kernels, and correctly."""
    script = (
        "import os; os.environ.pop('TRITON_INTERPRET', None); import triton, torch; "
        "os.environ['TRITON_INTERPRET'] = '1'; "
        "from kmodel.kernels.attention import reference, triton_impl; "
        "q, k, v = torch.randn(1, 40, 2, 16), torch.randn(1, 40, 1, 16), torch.randn(1, 40, 1, 16); "
        "torch.testing.assert_close(triton_impl.attention(q, k, v, window=7), "
        "reference.attention(q, k, v, window=7), atol=1e-5, rtol=1e-4); print('matched')"
    )
    result = subprocess.run(python_command("-c", script), check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "matched" in result.stdout, result.stderr[-2000:]


_OFFSETS_PAST_INT32 = """
import os, sys
os.environ["TRITON_INTERPRET"] = "1"
import torch
from kmodel.kernels.attention import reference, triton_impl
seq, heads, dim = 5, 2, 16
row_stride = (1 << 29) + 64  # row 4 starts past 2**31 elements: an int32 offset wraps to a wild address
numel = (seq - 1) * row_stride + heads * dim
path = sys.argv[1]
with open(path, "wb") as f:
    f.truncate(numel * 4)  # sparse: only the pages the five rows touch ever get memory
qkv = torch.from_file(path, shared=True, size=numel, dtype=torch.float32)
qkv = qkv.as_strided((1, seq, heads, dim), (0, row_stride, dim, 1))
compact = torch.randn(1, seq, heads, dim, generator=torch.Generator().manual_seed(0))
qkv.copy_(compact)
leaf = qkv.detach().requires_grad_()
triton_impl.attention(leaf, leaf, leaf, window=3).square().sum().backward()
want = compact.double().requires_grad_()
reference.attention(want, want, want, window=3).square().sum().backward()
got = triton_impl.attention(qkv, qkv, qkv, window=3)
torch.testing.assert_close(got.double(), reference.attention(*(compact.double(),) * 3, window=3), atol=1e-5, rtol=1e-4)
torch.testing.assert_close(leaf.grad.double(), want.grad, atol=1e-5, rtol=1e-4)
print("matched")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter mode only (a 8 GiB sparse file on the CPU)")
def test_row_offsets_past_int32(tmp_path):
    """Element offsets rows * row_stride pass 2**31 at 256K tokens x 64 heads x 128 (K-EXAONE's context): a
    strided view over a sparse file puts row 4 past that for the price of five rows; forward and backward
    (every kernel reading q, k and v) must read the right rows. int32 offsets wrapped (a segfault here), so it
    runs in its own process."""
    command = python_command("-c", _OFFSETS_PAST_INT32, str(tmp_path / "sparse.bin"))
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "matched" in result.stdout, (result.returncode, result.stderr[-2000:])


@pytest.mark.parametrize("winner", [0, -1])
def test_autotune_sequence_leaves_nothing_behind(winner):
    """triton.autotune runs every CUDA config on the live buffers, then the winner: replayed under the
    interpreter, forward and backward (windows, documents, sinks, GQA) still equal the float64 reference, so no
    kernel reads what an earlier config wrote."""
    from kmodel.kernels.triton_support import replay_autotuning

    gen, seed = _fresh_generator()
    inputs = _random_inputs(gen, 1, 37, 4, 2, 16)
    kw = dict(window=9, cu_seqlens=_random_cu_seqlens(gen, 37, 3), sinks=_random_sinks(gen, 4))
    with replay_autotuning(winner):
        _assert_matches_reference(*inputs, seed, **kw)


def test_document_bounds_read_nothing_on_the_host():
    """Packed documents: the bounds are computed on the device. Meta tensors have no values, so any host read
    (bool(), int(), .tolist(): each a GPU sync) raises; before, three did per attention call."""
    cu = torch.tensor([0, 5, 5, 13, 20, 24])
    start, end = triton_impl.document_bounds(cu.to("meta"), 2, 12)
    assert start.shape == end.shape == (2, 12) and start.dtype == torch.int32
    start, end = triton_impl.document_bounds(cu, 2, 12)
    doc = reference.document_ids(cu, 2, 12)
    assert torch.equal(start, (cu[doc] - torch.tensor([[0], [12]])).clamp(min=0).int())
    assert torch.equal(end, (cu[doc + 1] - torch.tensor([[0], [12]])).clamp(max=12).int())


def test_autotune_key_buckets_sequence_length_and_window(monkeypatch):
    """The attention kernels are tuned per power-of-two bucket of length and window: prompts of 17..32 tokens
    share one tuning instead of benchmarking every config at each new length (generation). The key is formed
    as triton.autotune forms it, from the launch's arguments."""
    keys = []

    def record(name, grid, dims, *args, **meta):
        arg_names = getattr(triton_kernels, name).arg_names
        named = {**dict(zip(arg_names, args)), **meta, **dims}
        keys.append((name, tuple(named[key] for key in triton_impl._AUTOTUNE_KEY)))

    monkeypatch.setattr(triton_impl, "_launch", record)
    q = torch.zeros(1, 40, 2, 16, device=DEVICE)
    for seq in (17, 20, 31, 32, 33):
        for window in (None, 5, 7):
            triton_impl.attention_forward(
                q[:, :seq], q[:, :seq], q[:, :seq], q[:, :seq], torch.zeros(1, 2, seq, device=DEVICE),
                window=window, causal=True, scale=0.25, doc_bounds=None,
            )
    distinct = {key for _, key in keys}
    assert len(distinct) == 2 * 2, distinct  # lengths in {32, 64} x windows in {none, 8}; exact: 5 x 3


def test_bad_inputs_raise_clear_errors(monkeypatch):
    q = torch.zeros(1, 8, 4, 16, device=DEVICE)
    kv = torch.zeros(1, 8, 2, 16, device=DEVICE)
    with pytest.raises(ValueError, match="q must be"):
        triton_impl.attention(q[0], kv, kv)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        triton_impl.attention(q, torch.zeros(1, 8, 3, 16, device=DEVICE), torch.zeros(1, 8, 3, 16, device=DEVICE))
    with pytest.raises(ValueError, match="match q"):
        triton_impl.attention(q, kv[:, :5], kv[:, :5])
    with pytest.raises(ValueError, match="must match in batch, seq and heads"):
        triton_impl.attention(q, kv, kv[:, :, :1])
    with pytest.raises(TypeError, match="q has dtype torch.float64"):
        triton_impl.attention(q.double(), kv.double(), kv.double())
    with pytest.raises(TypeError, match="inputs must share one dtype"):  # as SDPA: mixed only under autocast
        triton_impl.attention(q, kv, kv.half())
    with pytest.raises(ValueError, match=r"sinks must be one float logit per query head, \(4,\)"):
        triton_impl.attention(q, kv, kv, sinks=torch.zeros(2, device=DEVICE))
    for window in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="window must be"):
            triton_impl.attention(q, kv, kv, window=window)
    with pytest.raises(ValueError, match="exceed the supported 256"):
        big = torch.zeros(1, 2, 1, 512, device=DEVICE)
        triton_impl.attention(big, big, big)
    with pytest.raises(TypeError, match="cu_seqlens must hold integers"):
        triton_impl.attention(q, kv, kv, cu_seqlens=torch.tensor([0.0, 8.0], device=DEVICE))
    if DEVICE == "cpu":
        # Device-side asserts (no host sync): on CPU they raise at once; on CUDA they would end the context.
        with pytest.raises(RuntimeError, match="end at batch"):
            triton_impl.attention(q, kv, kv, cu_seqlens=torch.tensor([0, 3, 7], device=DEVICE))
        with pytest.raises(RuntimeError, match="must not decrease"):
            triton_impl.attention(q, kv, kv, cu_seqlens=torch.tensor([0, 5, 3, 8], device=DEVICE))
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="needs CUDA"):
            triton_impl.attention(q, kv, kv)


def _decode_case(gen, cache_lens, new, q_heads, kv_heads, head_dim, capacity, dtype=torch.float32, v_dim=None):
    """Full-sequence inputs, the caches filled from them with NaN past each row's length, and the new queries."""
    batch = len(cache_lens)
    q_full, k, v, _ = _random_inputs(gen, batch, capacity, q_heads, kv_heads, head_dim, dtype, v_dim)
    k_cache, v_cache = k.clone(), v.clone()
    for row, length in enumerate(cache_lens):
        k_cache[row, length:] = float("nan")
        v_cache[row, length:] = float("nan")
    q = torch.stack([q_full[row, length - new : length] for row, length in enumerate(cache_lens)])
    return q_full, k, v, q, k_cache, v_cache


def _decode_reference(q_full, k, v, cache_lens, new, dtype=torch.float64, sinks=None, **kw):
    """Each row's last `new` outputs of the reference over its whole sequence."""
    rows = []
    sinks = None if sinks is None else sinks.to(dtype)
    for row, length in enumerate(cache_lens):
        full = (t[row : row + 1, :length].to(dtype) for t in (q_full, k, v))
        rows.append(reference.attention(*full, sinks=sinks, **kw)[0, length - new :])
    return torch.stack(rows)


@pytest.mark.parametrize("new", [1, 3])
@pytest.mark.parametrize(
    "window,sinks,v_dim", [(None, False, 24), (1, False, 24), ("rand", False, 24), ("rand", True, 24), (7, True, 16)]
)
def test_decode_matches_reference(new, window, sinks, v_dim):
    """A few new tokens against a KV cache equal the last rows of full attention; slots past each row's
    length hold NaN, so reading one would show."""
    gen, seed = _fresh_generator()
    capacity = 70
    cache_lens = [capacity, int(torch.randint(new, capacity, (), generator=gen)), new]
    if window == "rand":
        window = int(torch.randint(1, capacity + 5, (), generator=gen))
    q_full, k, v, q, k_cache, v_cache = _decode_case(gen, cache_lens, new, 4, 2, 24, capacity, v_dim=v_dim)
    sinks = _random_sinks(gen, 4) if sinks else None
    lens = torch.tensor(cache_lens, device=DEVICE)
    kw = dict(window=window, scale=0.25, sinks=sinks)
    got = triton_impl.decode_attention(q, k_cache, v_cache, cache_lens=lens, **kw)
    want = _decode_reference(q_full, k, v, cache_lens, new, **kw)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-4, msg=lambda m: f"seed {seed}, W={window}: {m}")
    # The reference's decode (the kernel seam's torch side) has the same semantics.
    sinks64 = None if sinks is None else sinks.double()
    ref = reference.decode_attention(q.double(), k_cache.double(), v_cache.double(), cache_lens=lens, window=window,
                                     scale=0.25, sinks=sinks64)
    torch.testing.assert_close(ref, want, atol=1e-10, rtol=1e-10, msg=lambda m: f"reference (seed {seed}): {m}")


def test_decode_more_new_tokens_than_one_launch(monkeypatch):
    """A chunk of new tokens wider than one launch's rows (a long speculative or chunked prefill) is decoded in
    consecutive launches, each ending at its own last token, rather than refused."""
    monkeypatch.setattr(triton_impl, "MAX_DECODE_ROWS", 4)  # 2 tokens x 2 query heads per launch: 3 launches
    gen, seed = _fresh_generator()
    cache_lens, new = [30, 9], 5
    q_full, k, v, q, k_cache, v_cache = _decode_case(gen, cache_lens, new, 4, 2, 16, 30)
    lens = torch.tensor(cache_lens, device=DEVICE)
    got = triton_impl.decode_attention(q, k_cache, v_cache, cache_lens=lens, window=6)
    want = _decode_reference(q_full, k, v, cache_lens, new, window=6)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-4, msg=lambda m: f"seed {seed}: {m}")


def test_decode_bad_inputs():
    q = torch.zeros(2, 2, 4, 16, device=DEVICE)
    cache = torch.zeros(2, 10, 2, 16, device=DEVICE)
    with pytest.raises(ValueError, match=r"cache_lens must be \(2,\) integers"):
        triton_impl.decode_attention(q, cache, cache, cache_lens=torch.tensor([5.0, 5.0], device=DEVICE))
    with pytest.raises(ValueError, match="match q"):
        triton_impl.decode_attention(q, cache[:1], cache[:1], cache_lens=torch.tensor([5, 5], device=DEVICE))
    if DEVICE == "cpu":  # a device assert (no host sync per step): raises at once on CPU, ends a CUDA context
        with pytest.raises(RuntimeError, match=r"cache_lens must lie in \[new tokens=2, capacity=10\]"):
            triton_impl.decode_attention(q, cache, cache, cache_lens=torch.tensor([11, 5], device=DEVICE))
        with pytest.raises(RuntimeError, match="cache_lens must lie"):
            triton_impl.decode_attention(q, cache, cache, cache_lens=torch.tensor([1, 5], device=DEVICE))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("window,docs,sinks", [(None, 0, False), (256, 0, False), (100, 5, False), (None, 7, True)])
def test_half_precision_error_within_twice_pytorch(dtype, head_dim, window, docs, sinks):
    """As flash-attention's own tests: the kernel's error against float64 is at most twice that of the same
    PyTorch math run in the low precision (plus a hair for exact ties)."""
    gen, seed = _fresh_generator()
    batch, seq, q_heads, kv_heads = 2, 1031, 8, 2
    q, k, v, grad_out = _random_inputs(gen, batch, seq, q_heads, kv_heads, head_dim, dtype)
    cu_seqlens = _random_cu_seqlens(gen, batch * seq, docs) if docs else None
    kw = dict(window=window, cu_seqlens=cu_seqlens, sinks=_random_sinks(gen, q_heads) if sinks else None)
    got = _run(triton_impl, q, k, v, grad_out, **kw)
    low = _run(reference, q, k, v, grad_out, **kw)
    want = _reference64(q, k, v, grad_out, **kw)
    for name, g, lo, w in zip(NAMES, got, low, want):
        err = (g.double() - w).abs().max().item()
        base = (lo.double() - w).abs().max().item()
        assert math.isfinite(err) and err <= 2 * base + 1e-5, f"{name}: {err:.3g} vs PyTorch {base:.3g} (seed {seed})"


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("window", [None, 512])
def test_decode_half_precision_error_within_twice_pytorch(dtype, head_dim, window):
    gen, seed = _fresh_generator()
    capacity, new = 3000, 2
    cache_lens = [capacity, 1777, 130]
    q_full, k, v, q, k_cache, v_cache = _decode_case(gen, cache_lens, new, 32, 8, head_dim, capacity, dtype)
    lens = torch.tensor(cache_lens, device=DEVICE)
    got = triton_impl.decode_attention(q, k_cache, v_cache, cache_lens=lens, window=window)
    low = _decode_reference(q_full, k, v, cache_lens, new, dtype=dtype, window=window)
    want = _decode_reference(q_full, k, v, cache_lens, new, window=window)
    err, base = ((t.double() - want).abs().max().item() for t in (got, low))
    assert math.isfinite(err) and err <= 2 * base + 1e-5, f"{err:.3g} vs PyTorch {base:.3g} (seed {seed})"


@pytest.mark.slow
@pytest.mark.parametrize("plain", [False, True])
def test_every_kernel_compiles_for_hopper(plain, tmp_path):
    """Each kernel's first CUDA config compiles for sm_90 with triton's bundled ptxas, no GPU needed: catches
    code the interpreter accepts but the compiler rejects. A fresh process, since this one's triton library
    was built for the interpreter."""
    out = tmp_path / "compile"
    command = python_command("-m", "kmodel.kernels.attention.compile_report", "--head-dim", "128", "--first-only")
    command += ["--out", str(out)] + (["--plain"] if plain else [])
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert {row["kernel"] for row in rows} == {name for name, *_ in compile_report.launch_configs(128)}
    for row in rows:
        assert 0 < row["registers"] <= 255 and row["shared_bytes"] <= 227 * 1024, row


@pytest.mark.slow
def test_mla_backward_configs_compile_to_wgmma(tmp_path):
    """MLA's q/k (192, as 128 + 64) with v at 128: every config compiles for sm_90 without spills, and every
    dK/dV config to warpgroup MMA (wgmma in the PTX); the old 32-key blocks compiled to mma.sync."""
    out = tmp_path / "mla"
    command = python_command("-m", "kmodel.kernels.attention.compile_report", "--head-dim", "192", "--v-dim", "128",
                             "--out", str(out))  # fmt: skip
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    for row in rows:
        assert row["spill_stack_bytes"] == 0 and row["shared_bytes"] <= 227 * 1024, row
    dkdv = [row for row in rows if row["kernel"] == "attention_bwd_dkdv_kernel"]
    assert len(dkdv) == len(triton_impl.cuda_configs("attention_bwd_dkdv_kernel", 192, 128))
    assert all(row["wgmma"] for row in dkdv), dkdv


def test_bench_visible_area_and_cpu_smoke_run(tmp_path):
    from kmodel.kernels.attention import bench

    for seq, window in ((37, None), (37, 1), (37, 10), (37, 37), (37, 80)):
        mask = _dense_mask(1, seq, window, True, None)
        assert bench.visible_pairs(seq, window) == int(mask.sum()), (seq, window)
    out = tmp_path / "attention_cpu"
    argv = ["--device", "cpu", "--seq", "48", "--windows", "16", "none", "--q-heads", "4", "--kv-heads", "2",
            "--head-dim", "16", "--warmup", "0", "--repeats", "1", "--out", str(out)]  # fmt: skip
    assert bench.main(argv) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [(r["impl"], r["window"]) for r in rows] == [
        ("reference", 16), ("reference", "global"), ("sdpa", 16), ("sdpa", "global"),
    ]  # fmt: skip
    assert all(r["fwd_ms"] > 0 and r["fwd_bwd_tflops"] > 0 for r in rows if r["impl"] == "reference")
    assert "no sliding window" in rows[2]["note"]
    assert "CPU smoke run" in out.with_suffix(".md").read_text()


def test_model_with_triton_attention_matches_torch_attention():
    """The tiny recipe's sliding and global layers through `kernels.attention=triton`: same logits and
    parameter gradients as with the PyTorch reference (other kernels stay on torch in both)."""
    from kmodel.config import load_config
    from kmodel.model import build_model

    gen, seed = _fresh_generator()
    overrides = ["model.sliding_window=16", "kernels.moe=torch", "kernels.norm=torch", "kernels.loss=torch"]
    configs = {
        impl: load_config("recipes/tiny-ko-moe.yaml", overrides=[*overrides, f"kernels.attention={impl}"])
        for impl in ("triton", "torch")
    }
    models = {impl: build_model(cfg, DEVICE) for impl, cfg in configs.items()}
    assert {"sliding_attention", "full_attention"} <= set(models["torch"].cfg.layer_types)
    assert any(getattr(module, "kernel", None) is triton_impl for module in models["triton"].modules())
    ids = torch.randint(0, 100, (1, 40), generator=gen).to(DEVICE)
    logits = {}
    for impl, model in models.items():
        logits[impl] = model(ids).logits
        logits[impl].float().pow(2).mean().backward()
    torch.testing.assert_close(
        logits["triton"], logits["torch"], atol=2e-5, rtol=1e-4, msg=lambda m: f"seed {seed}: {m}"
    )
    for (name, p_triton), p_torch in zip(models["triton"].named_parameters(), models["torch"].parameters()):
        if p_torch.grad is not None:
            scale = p_torch.grad.abs().max().clamp(min=1e-12)
            assert ((p_triton.grad - p_torch.grad).abs().max() / scale) < 1e-4, f"{name} (seed {seed})"


@pytest.mark.parametrize("recipe", ["recipes/tiny-ko-moe.yaml", "recipes/tiny/deepseek-v3.yaml"], ids=["gqa", "mla"])
def test_cached_generation_goes_through_the_kernel_seam(recipe, monkeypatch):
    """`kernels.attention=triton` applies to generation too: the cached steps call the Triton decode kernel
    (GQA with sliding and global layers; MLA with its expanded latents), and prefill + steps give the logits of
    one uncached forward."""
    from kmodel.config import load_config
    from kmodel.model import build_model

    calls = []
    decode = triton_impl.decode_attention
    monkeypatch.setattr(triton_impl, "decode_attention", lambda *a, **kw: calls.append(1) or decode(*a, **kw))
    overrides = ["model.sliding_window=4", "kernels.attention=triton", "kernels.moe=torch", "kernels.norm=torch"]
    cfg = load_config(recipe, overrides=overrides)
    model = build_model(cfg, DEVICE).eval()
    ids = torch.randint(0, cfg.model.vocab_size, (1, 9), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache()
        steps = [model(ids[:, :6], cache=cache).logits]
        for pos in range(6, 9):
            position = torch.tensor([pos], device=DEVICE)
            steps.append(model(ids[:, pos : pos + 1], position_ids=position, cache=cache).logits)
    assert len(calls) == 3 * cfg.model.num_hidden_layers
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=2e-5)
