"""Per-module geometry of LoRA updates from their factors, never forming ``d_out x d_in``.

A module's update is ``dW = s * B @ A`` (``B``: ``d_out x r``, ``A``: ``r x d_in``). Everything
here works on ``r x r`` matrices built from the factors in float64 (cost ``O((d_out + d_in)
r1 r2)`` per pair):

- Frobenius inner product ``<B1 A1, B2 A2>_F = trace((B1^T B2)(A2 A1^T))``, norms likewise.
- Principal angles between column spaces (span of ``B``) and row spaces (span of ``A^T``):
  ``Q = B R^-1`` with ``R = chol(B^T B)`` is an orthonormal basis, so the cosines are the
  singular values of ``R1^-T (B1^T B2) R2^-1``. Rank-deficient factors (a Gram eigenvalue
  below ``rtol`` times the largest) use ``W = V_k diag(lambda_k)^-1/2`` from the Gram's
  eigen-decomposition instead of ``R^-1``, dropping the null directions (reported in
  :attr:`ModuleFactors.deficient`). Angles below 45 degrees are refined from their sines
  (the residual ``Q_small - Q_big (Q_big^T Q_small)``, as ``scipy.linalg.subspace_angles``
  does), so identical subspaces give 0 and not ``arccos(1 - eps)``.
- Top-k singular subspaces via the core SVD: ``B = Q_b T_b``, ``A^T = Q_a T_a`` (``T = W^T G``),
  ``dW = s Q_b (T_b T_a^T) Q_a^T``; the SVD of the small core gives ``U = B W_b U_c`` etc.
- Subspace overlap ``|U1^T U2|_F^2 / k`` of the top-k left singular subspaces, and the energy
  overlap ``|P_{U2} dW1|_F^2 / |dW1|_F^2`` (and the reverse).
- ``a_row_cosine``: the mean cosine between CORRESPONDING rows of ``A1`` and ``A2`` (row ``i``
  with row ``i``; equal ranks only), the fingerprint of a shared LoRA initialisation (same
  seed: PEFT draws ``A`` from the seed and ``B = 0``, and ``A`` moves little in training);
  independent adapters give 0 with sd ``1/sqrt(r d_in)``. See
  :data:`emscope.geometry.analysis.SHARED_INIT_COSINE`.

Written here because no library computes these on factored matrices: scipy's
``subspace_angles`` QR-factorises the tall ``d x r`` matrices (too slow on 7B shapes); it is
the reference the tests compare against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch

from emscope.errors import EmscopeError
from emscope.lora import LoraModule

DEFAULT_RTOL = 1e-10
"""Default relative eigenvalue cut-off of a Gram matrix (singular value ratio 1e-5)."""


@dataclass(frozen=True)
class ModuleFactors:
    """One adapter module prepared for comparisons (all arrays float64, unscaled factors).

    ``B``: ``d_out x r``; ``A``: ``r x d_in``; ``white_b`` (``r x rank_b``) makes ``B @ white_b``
    orthonormal, likewise ``A.T @ white_a``. ``left`` (``r x m``) gives the left singular vectors
    of ``dW`` as ``B @ left`` and ``right`` the right ones as ``A.T @ right``, with singular
    values ``singular_values`` (descending, scale included). ``norm`` = ``|dW|_F``.
    """

    name: str
    d_out: int
    d_in: int
    rank: int
    scale: float
    B: np.ndarray
    A: np.ndarray
    gram_a: np.ndarray
    white_b: np.ndarray
    white_a: np.ndarray
    left: np.ndarray
    right: np.ndarray
    singular_values: np.ndarray
    norm: float
    deficient: str | None = None

    @property
    def rank_b(self) -> int:
        """Dimension of the column space (span of B) kept."""
        return int(self.white_b.shape[1])

    @property
    def rank_a(self) -> int:
        """Dimension of the row space (span of A^T) kept."""
        return int(self.white_a.shape[1])

    @property
    def module_type(self) -> str:
        return self.name.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class ModuleComparison:
    """Measures between two updates of one module (``a`` = first, ``b`` = second adapter).

    Angles in degrees, ascending; ``k`` = dimension of the top-k subspaces used by
    ``overlap`` / ``energy_overlap_*`` (NaN measures when an update is zero).
    ``a_row_cosine``: mean cosine of corresponding rows of the two ``A`` factors (NaN for
    unequal ranks or a zero row; see the module docstring).
    """

    module: str
    d_out: int
    d_in: int
    rank_a: int
    rank_b: int
    k: int
    inner: float
    norm_a: float
    norm_b: float
    cosine: float
    principal_angles_deg: tuple[float, ...]
    row_principal_angles_deg: tuple[float, ...]
    overlap: float
    energy_overlap_ab: float
    energy_overlap_ba: float
    a_row_cosine: float = math.nan

    @property
    def mean_principal_angle_deg(self) -> float:
        angles = self.principal_angles_deg
        return float(np.mean(angles)) if angles else math.nan

    def fields(self) -> dict[str, object]:
        """The fields of ``geometry.json``'s per-module entries."""
        return {
            "cosine": self.cosine,
            "principal_angles_deg": list(self.principal_angles_deg),
            "row_principal_angles_deg": list(self.row_principal_angles_deg),
            "mean_principal_angle_deg": self.mean_principal_angle_deg,
            "overlap": self.overlap,
            "energy_overlap_ab": self.energy_overlap_ab,
            "energy_overlap_ba": self.energy_overlap_ba,
        }


def _whitening(gram: np.ndarray, rtol: float) -> tuple[np.ndarray, bool]:
    """``W`` (``r x r_kept``) with ``W^T G W = I``; Cholesky when ``G`` is well ranked."""
    r = gram.shape[0]
    eigvals, eigvecs = np.linalg.eigh(gram)
    top = float(eigvals[-1]) if r else 0.0
    if top <= 0.0:
        return np.zeros((r, 0)), r > 0
    keep = eigvals > rtol * top
    if keep.all():
        try:
            upper = scipy.linalg.cholesky(gram, lower=False)
            return scipy.linalg.solve_triangular(upper, np.eye(r), lower=False), False
        except np.linalg.LinAlgError:  # pragma: no cover - guarded by the eigenvalue test
            pass
    return eigvecs[:, keep] / np.sqrt(eigvals[keep]), not keep.all()


def module_factors(
    module: LoraModule,
    rtol: float = DEFAULT_RTOL,
) -> ModuleFactors:
    """Prepare one module: float64 factors, Gram matrices, whitening, core SVD.

    Cost ``O((d_out + d_in) r^2)``; nothing ``d_out x d_in`` is formed.
    """
    B, A = _float64(module.B), _float64(module.A)
    return factors_from_arrays(module.name, B, A, module.scale, rtol)


def _float64(t: torch.Tensor) -> np.ndarray:
    """Exact float64 copy; half types go through float32 (lossless, ~10x faster than direct)."""
    t = t.detach().to("cpu")
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    return t.double().numpy()


def factors_from_arrays(
    name: str, B: np.ndarray, A: np.ndarray, scale: float, rtol: float = DEFAULT_RTOL
) -> ModuleFactors:
    """:func:`module_factors` from float64 arrays ``B`` (``d_out x r``) and ``A`` (``r x d_in``)."""
    if B.ndim != 2 or A.ndim != 2 or B.shape[1] != A.shape[0]:
        raise EmscopeError(f"module {name!r}: factor shapes {B.shape} and {A.shape} do not pair")
    gram_b = B.T @ B
    gram_a = A @ A.T
    white_b, def_b = _whitening(gram_b, rtol)
    white_a, def_a = _whitening(gram_a, rtol)
    t_b = white_b.T @ gram_b  # B = Q_b t_b
    t_a = white_a.T @ gram_a  # A^T = Q_a t_a
    core = t_b @ t_a.T
    if core.size:
        u_c, s_c, vh_c = np.linalg.svd(core, full_matrices=False)
    else:
        u_c = np.zeros((white_b.shape[1], 0))
        s_c = np.zeros(0)
        vh_c = np.zeros((0, white_a.shape[1]))
    norm_sq = float(np.sum(gram_b * gram_a))  # trace(G_b G_a), both symmetric
    norm = abs(scale) * math.sqrt(max(norm_sq, 0.0))
    notes = []
    if def_b:
        notes.append(f"B has rank {white_b.shape[1]} < {B.shape[1]}")
    if def_a:
        notes.append(f"A has rank {white_a.shape[1]} < {A.shape[0]}")
    return ModuleFactors(
        name=name,
        d_out=int(B.shape[0]),
        d_in=int(A.shape[1]),
        rank=int(A.shape[0]),
        scale=float(scale),
        B=B,
        A=A,
        gram_a=gram_a,
        white_b=white_b,
        white_a=white_a,
        left=white_b @ u_c,
        right=white_a @ vh_c.T,
        singular_values=abs(scale) * s_c,
        norm=norm,
        deficient="; ".join(notes) or None,
    )


def _angles_deg(
    cross: np.ndarray,
    basis_1: tuple[np.ndarray, np.ndarray],
    basis_2: tuple[np.ndarray, np.ndarray],
) -> tuple[float, ...]:
    """Principal angles (degrees, ascending) from the cross Gram ``X1^T X2`` of two factors.

    ``basis_i`` = (tall factor ``X_i``, whitening ``W_i``): ``Q_i = X_i W_i`` is orthonormal.
    """
    (x1, w1), (x2, w2) = basis_1, basis_2
    m = w1.T @ cross @ w2
    if m.size == 0:
        return ()
    cos = np.clip(np.linalg.svd(m, compute_uv=False), 0.0, 1.0)  # descending
    angles = np.arccos(cos)
    small = cos**2 >= 0.5
    if small.any():
        # sines from the residual of the smaller space after projection on the larger one
        wide = m.shape[0] < m.shape[1]
        resid = (x1 @ w1 - (x2 @ w2) @ m.T) if wide else (x2 @ w2 - (x1 @ w1) @ m)
        sin_sq = np.clip(np.linalg.eigvalsh(resid.T @ resid), 0.0, 1.0)  # ascending
        sines = np.sqrt(sin_sq[: cos.size])
        angles[small] = np.arcsin(sines[small])
    return tuple(float(a) for a in np.sort(np.degrees(angles)))


def row_cosine(a1: np.ndarray, a2: np.ndarray) -> float:
    """Mean cosine between corresponding rows of two ``r x d_in`` factors (NaN for unequal
    shapes or a zero row)."""
    if a1.shape != a2.shape or a1.shape[0] == 0:
        return math.nan
    n1, n2 = np.linalg.norm(a1, axis=1), np.linalg.norm(a2, axis=1)
    if not (np.all(n1 > 0) and np.all(n2 > 0)):
        return math.nan
    return float(np.mean(np.sum(a1 * a2, axis=1) / (n1 * n2)))


def compare_factors(f1: ModuleFactors, f2: ModuleFactors, k: int | None = None) -> ModuleComparison:
    """All pair measures of one module from two prepared adapters.

    ``k``: dimension of the top-k singular subspaces for ``overlap`` and the energy overlaps;
    ``None`` = ``min(r1, r2)``. It is capped at the ranks of the two updates.
    """
    if (f1.d_out, f1.d_in) != (f2.d_out, f2.d_in):
        raise EmscopeError(
            f"module {f1.name!r}: shapes differ between adapters "
            f"({f1.d_out}x{f1.d_in} vs {f2.d_out}x{f2.d_in}); are they for the same base model?"
        )
    cross_b = f1.B.T @ f2.B  # r1 x r2
    cross_a = f1.A @ f2.A.T  # r1 x r2
    inner = f1.scale * f2.scale * float(np.sum(cross_b * cross_a))
    denom = f1.norm * f2.norm
    cosine = inner / denom if denom > 0 else math.nan
    col = _angles_deg(cross_b, (f1.B, f1.white_b), (f2.B, f2.white_b))
    row = _angles_deg(cross_a, (f1.A.T, f1.white_a), (f2.A.T, f2.white_a))

    kk = min(f1.rank, f2.rank) if k is None else int(k)
    kk = min(kk, f1.singular_values.size, f2.singular_values.size)
    if kk <= 0 or denom == 0:
        overlap = energy_ab = energy_ba = math.nan
    else:
        p1 = f1.left[:, :kk]  # U1 = B1 p1
        p2 = f2.left[:, :kk]
        u12 = p1.T @ cross_b @ p2
        overlap = float(np.sum(u12**2)) / kk
        # |U2^T dW1|^2 = s1^2 |p2^T B2^T B1 A1|^2 = s1^2 tr(Y G_a1 Y^T), Y = p2^T X_b^T
        y_ab = p2.T @ cross_b.T
        y_ba = p1.T @ cross_b
        energy_ab = f1.scale**2 * float(np.sum((y_ab @ f1.gram_a) * y_ab)) / f1.norm**2
        energy_ba = f2.scale**2 * float(np.sum((y_ba @ f2.gram_a) * y_ba)) / f2.norm**2
    return ModuleComparison(
        module=f1.name,
        d_out=f1.d_out,
        d_in=f1.d_in,
        rank_a=f1.rank,
        rank_b=f2.rank,
        k=max(kk, 0),
        inner=inner,
        norm_a=f1.norm,
        norm_b=f2.norm,
        cosine=cosine,
        principal_angles_deg=col,
        row_principal_angles_deg=row,
        overlap=overlap,
        energy_overlap_ab=energy_ab,
        energy_overlap_ba=energy_ba,
        a_row_cosine=_row_cosine_from_grams(cross_a, f1.gram_a, f2.gram_a),
    )


def _row_cosine_from_grams(cross: np.ndarray, gram_1: np.ndarray, gram_2: np.ndarray) -> float:
    """:func:`row_cosine` from ``A1 A2^T`` and the two Gram matrices (``r x r``)."""
    if cross.shape[0] != cross.shape[1] or cross.shape[0] == 0:
        return math.nan
    n1, n2 = np.sqrt(np.diag(gram_1)), np.sqrt(np.diag(gram_2))
    if not (np.all(n1 > 0) and np.all(n2 > 0)):
        return math.nan
    return float(np.mean(np.diag(cross) / (n1 * n2)))


def compare_modules(
    m1: LoraModule, m2: LoraModule, k: int | None = None, rtol: float = DEFAULT_RTOL
) -> ModuleComparison:
    """:func:`compare_factors` on two :class:`~emscope.lora.LoraModule` values."""
    return compare_factors(module_factors(m1, rtol), module_factors(m2, rtol), k)


def singular_subspace(
    module: LoraModule | ModuleFactors, k: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k singular triplets of ``dW`` without forming it: ``U`` (``d_out x k``), singular
    values (``k``, descending), ``V`` (``d_in x k``), float64. ``k=None``: all (min of ranks)."""
    f = module if isinstance(module, ModuleFactors) else module_factors(module)
    kk = f.singular_values.size if k is None else min(int(k), f.singular_values.size)
    return f.B @ f.left[:, :kk], f.singular_values[:kk].copy(), f.A.T @ f.right[:, :kk]


# ---------------------------------------------------------------- against the base weight


@dataclass(frozen=True)
class BaseComparison:
    """``cos(W0, dW)`` of one module: ``inner = <W0, dW>_F``, ``norm_base = |W0|_F``."""

    module: str
    inner: float
    norm_base: float
    norm_update: float

    @property
    def cosine(self) -> float:
        denom = self.norm_base * self.norm_update
        return self.inner / denom if denom > 0 else math.nan


def compare_base(f: ModuleFactors, row_blocks: object) -> BaseComparison:
    """``<W0, s B A>_F = s trace(A W0^T B)`` from ``W0`` given as row blocks.

    ``row_blocks``: an iterable of ``(start_row, block)`` with float64 blocks of ``W0``
    (``rows x d_in``), or a whole ``d_out x d_in`` array. One ``W0^T B`` product, blockwise.
    """
    if isinstance(row_blocks, np.ndarray):
        row_blocks = [(0, row_blocks)]
    w0t_b = np.zeros((f.d_in, f.rank))
    norm_sq = 0.0
    rows = 0
    for start, block in row_blocks:  # type: ignore[attr-defined]
        block = np.asarray(block, dtype=np.float64)
        if block.ndim != 2 or block.shape[1] != f.d_in or start + block.shape[0] > f.d_out:
            raise EmscopeError(
                f"module {f.name!r}: base weight block {block.shape} at row {start} does not fit "
                f"the update's shape {f.d_out}x{f.d_in}"
            )
        w0t_b += block.T @ f.B[start : start + block.shape[0]]
        norm_sq += float(np.sum(block * block))
        rows += block.shape[0]
    if rows != f.d_out:
        raise EmscopeError(f"module {f.name!r}: base weight has {rows} rows, update {f.d_out}")
    inner = f.scale * float(np.sum(f.A.T * w0t_b))
    return BaseComparison(f.name, inner, math.sqrt(norm_sq), f.norm)


# ---------------------------------------------------------------- dense check route


def dense_compare(
    m1: LoraModule, m2: LoraModule, k: int | None = None, rtol: float = DEFAULT_RTOL
) -> ModuleComparison:
    """The same measures by the dense route: materialise both ``dW`` (float64), Frobenius
    cosine, thin SVD of each, angles between the singular subspaces (``d_out x d_in`` memory;
    for checks and benchmarks). Column/row spaces are those of ``dW`` (= span B / span A^T for
    full-rank factors)."""
    d1 = m1.scale * (m1.B.double() @ m1.A.double()).numpy()
    d2 = m2.scale * (m2.B.double() @ m2.A.double()).numpy()
    if d1.shape != d2.shape:
        raise EmscopeError(f"module {m1.name!r}: shapes differ ({d1.shape} vs {d2.shape})")
    n1, n2 = float(np.linalg.norm(d1)), float(np.linalg.norm(d2))
    inner = float(np.sum(d1 * d2))
    cosine = inner / (n1 * n2) if n1 * n2 > 0 else math.nan
    u1, s1, v1h = np.linalg.svd(d1, full_matrices=False)
    u2, s2, v2h = np.linalg.svd(d2, full_matrices=False)
    cut = math.sqrt(rtol)
    q1 = int(np.sum(s1 > cut * s1[0])) if s1[0] > 0 else 0
    q2 = int(np.sum(s2 > cut * s2[0])) if s2[0] > 0 else 0

    def angles(x: np.ndarray, y: np.ndarray) -> tuple[float, ...]:
        if x.shape[1] == 0 or y.shape[1] == 0:
            return ()
        return tuple(float(a) for a in np.sort(np.degrees(scipy.linalg.subspace_angles(x, y))))

    col = angles(u1[:, :q1], u2[:, :q2])
    row = angles(v1h[:q1].T, v2h[:q2].T)
    kk = min(m1.rank, m2.rank) if k is None else int(k)
    kk = min(kk, q1, q2)
    if kk <= 0:
        overlap = e_ab = e_ba = math.nan
    else:
        overlap = float(np.sum((u1[:, :kk].T @ u2[:, :kk]) ** 2)) / kk
        e_ab = float(np.sum((u2[:, :kk].T @ d1) ** 2)) / n1**2
        e_ba = float(np.sum((u1[:, :kk].T @ d2) ** 2)) / n2**2
    return ModuleComparison(
        module=m1.name,
        d_out=d1.shape[0],
        d_in=d1.shape[1],
        rank_a=m1.rank,
        rank_b=m2.rank,
        k=max(kk, 0),
        inner=inner,
        norm_a=n1,
        norm_b=n2,
        cosine=cosine,
        principal_angles_deg=col,
        row_principal_angles_deg=row,
        overlap=overlap,
        energy_overlap_ab=e_ab,
        energy_overlap_ba=e_ba,
        a_row_cosine=row_cosine(m1.A.double().numpy(), m2.A.double().numpy()),
    )
