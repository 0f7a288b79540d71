"""The Switch FFN layer and its FLOP-matched dense baseline (SPEC section 2), plus ``matmul``.

Both layers keep float32 master parameters in the C++ core and expose them as live NumPy views
(``.params``); ``backward`` writes ``.grads`` (live views too, overwritten by the next backward).

In bfloat16 the layers keep a bf16 compute copy of the expert matrices and re-round it only when
the masters may have changed. ``.params`` builds its views on each access: while any view of a
master (or a slice of one) is alive, every forward re-rounds, since it may have been written;
once all are gone, forwards reuse the copy. Writing through a view is therefore always seen.
"""

from __future__ import annotations

import numpy as np

from . import _core
from .routing import _as_device, _as_factor, _as_str, _router_options
from .runtime import _as_int, _as_seed

_ACTIVATIONS = ("relu", "gelu", "geglu")
_DTYPES = ("float32", "bfloat16")


def matmul(a: np.ndarray, b: np.ndarray, *, library: str = "pyswitch") -> np.ndarray:
    """``a @ b`` with the whole thread pool.

    With ``library="pyswitch"`` (default) this is the core's own GEMM kernel, the one every
    layer uses: element ``(m, n)`` is the float32 FMA chain over ``k = 0..K-1`` from +0, so row
    ``m`` depends only on ``a[m]`` and ``b``, bit for bit, whatever ``M``, the thread count or
    the CPU tier. ``library="onednn"`` runs the same product on oneDNN, the comparison baseline
    (its last bits may vary with threads and CPU; bfloat16 needs AVX-512 there).

    Parameters
    ----------
    a : ndarray (M, K), float32 or bfloat16
    b : ndarray (K, N), same dtype as ``a``
    library : {"pyswitch", "onednn"}

    Returns
    -------
    ndarray of float32, shape (M, N); bfloat16 operands accumulate in float32.
    """
    return _core.matmul(a, b, library=library)


class _FFNLayer:
    """What SwitchFFN and DenseFFN share: their tensors and the device-array path
    (``self._impl`` is the core layer, ``self._live_grads`` its gradient views on the cpu)."""

    @property
    def params(self) -> dict:
        """Live float32 views of the master parameters, made on each access (read-only host
        copies on cuda)."""
        return dict(self._impl.tensors(False))

    @property
    def grads(self) -> dict:
        """Live float32 views of the gradients, overwritten by each backward (read-only host
        copies of the current gradients on cuda)."""
        if self._live_grads is not None:
            return self._live_grads
        return dict(self._impl.tensors(True))

    def forward_into(self, x, y, training: bool = False) -> None:
        """The device-array path of a ``device="cuda"`` layer: ``forward`` on CUDA arrays, with
        no copy.

        ``x`` and ``y`` are any C-contiguous (T, d_model) float32 or bfloat16 arrays on the GPU
        that export DLPack (``__dlpack__``: torch, CuPy, JAX); ``y`` (the dtype of ``x``) is
        written in place. The layer runs on the default CUDA stream, so work queued there by the
        caller is ordered with it.
        """
        self._impl.forward_into(x, y, bool(training))

    def backward_into(self, dy, dx) -> None:
        """``backward`` on CUDA arrays (see :meth:`forward_into`); ``dx`` is written in place."""
        self._impl.backward_into(dy, dx)


class SwitchFFN(_FFNLayer):
    """A Switch Transformer FFN layer: router, dispatch, expert FFNs, combine.

    ``y[t] = sum over kept j of gate[t, j] * Expert_{e[t, j]}(x[t])`` with
    ``Expert_e(x) = act(x @ w_in[e] + b_in[e]) @ w_out[e] + b_out[e]``; ``geglu`` is
    ``gelu(x @ w_in[e] + b_in[e]) * (x @ w_gate[e])`` and ``gelu`` is the tanh approximation.
    Dropped tokens get exactly 0 (the residual connection around the layer carries them).

    Parameters
    ----------
    d_model, d_ff, num_experts : int
    k, capacity_factor, eval_capacity_factor, min_capacity, group_size, priority,
    capacity_rounding, normalize_gates, jitter_eps
        Routing, as in :class:`pyswitch.Router`.
    activation : {"relu", "gelu", "geglu"}
    use_bias : bool
        Expert biases (off by default, as in T5).
    expert_dropout : float
        Dropout rate on the expert hidden activation, training only.
    dtype : {"float32", "bfloat16"}
        Compute dtype. In bfloat16 the parameters stay float32 (master copies); the GEMMs take
        a bfloat16 copy of the expert matrices, re-rounded only when the masters may have
        changed (see the module docstring), and accumulate in float32; the router is float32
        throughout.
    aux_loss_coef, z_loss_coef : float
        Scales of the load-balancing and z losses; ``aux_loss`` / ``z_loss`` report the scaled
        values, and ``backward`` includes them.
    init_scale : float
        Truncated-normal init, ``std = sqrt(init_scale / fan_in)``, cut at 2 std.
    seed : int
    device : {"cpu", "cuda"}
        Where the layer runs. "cuda" keeps parameters, gradients and activations on the GPU
        (one device, no ``comm``): ``forward``/``backward`` copy NumPy arrays in and out, and
        ``params``/``grads`` are read-only host copies. Raises :class:`pyswitch.DeviceError`
        where CUDA is not available (see :func:`pyswitch.cuda.is_available`).
    comm : pyswitch.comm.Communicator, optional
        Expert parallelism (SPEC section 3): rank r of W holds experts ``[r*E/W, (r+1)*E/W)``
        (``num_experts % W != 0`` is a ``ValueError``), initialised as those experts are in a
        one-rank layer of the same seed; the router is replicated. The layer is then one layer
        over the global batch: every rank calls ``forward`` and ``backward`` (ranks with zero
        tokens too), ``aux_loss`` / ``z_loss`` are the global losses, ``backward``
        differentiates the sum over ranks of ``sum(dy * y)`` plus those losses, expert
        gradients are complete, and the router gradient is this rank's share: sum it over ranks
        (:func:`pyswitch.comm.sum_gradients`). See "Gradient scale" in
        :mod:`pyswitch.comm`.

    Attributes
    ----------
    params, grads : dict of float32 ndarray
        ``router`` (d_model, E), ``w_in`` (E_local, d_model, d_ff), ``w_out`` (E_local, d_ff,
        d_model), and ``w_gate`` (geglu), ``b_in`` (E_local, d_ff), ``b_out`` (E_local, d_model)
        when present; ``E_local`` is ``num_experts`` on one rank, ``num_experts / W`` under
        expert parallelism. Live; ``params`` is a new dict of new views on every access (hold
        it only while you need it: in bfloat16 a live master view makes each forward re-round).
    aux_loss, z_loss : float
        Scaled losses of the last forward (0.0 before any).
    last_plan : RoutingPlan or None
        This rank's routing (its losses are the global ones under expert parallelism).
    first_expert, local_experts : int
        The global index of this rank's first expert and how many it holds.
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        *,
        k: int = 1,
        capacity_factor: float | None = 1.25,
        eval_capacity_factor: float | None = 2.0,
        min_capacity: int = 4,
        group_size: int | None = None,
        priority: str = "position",
        capacity_rounding: str = "floor",
        normalize_gates: bool = False,
        activation: str = "relu",
        use_bias: bool = False,
        expert_dropout: float = 0.0,
        dtype: str = "float32",
        aux_loss_coef: float = 1e-2,
        z_loss_coef: float = 1e-3,
        jitter_eps: float = 1e-2,
        init_scale: float = 0.1,
        seed: int = 0,
        comm=None,
        device: str = "cpu",
    ):
        where = "SwitchFFN"
        comm_impl = None
        if comm is not None:
            from .comm import Communicator

            if not isinstance(comm, Communicator):
                raise TypeError(
                    f"{where}: comm must be a pyswitch.comm.Communicator (from LocalGroup.run or "
                    f"MPIComm) or None, got {type(comm).__name__}"
                )
            comm_impl = comm._impl
        self.comm = comm
        self.dtype = _as_str(where, "dtype", dtype, _DTYPES)
        self.activation = _as_str(where, "activation", activation, _ACTIVATIONS)
        self.device = _as_device(where, device)
        options = _core.SwitchFFNOptions(
            router=_router_options(
                where,
                k=k,
                capacity_factor=capacity_factor,
                eval_capacity_factor=eval_capacity_factor,
                min_capacity=min_capacity,
                group_size=group_size,
                priority=priority,
                capacity_rounding=capacity_rounding,
                normalize_gates=normalize_gates,
                jitter_eps=jitter_eps,
                init_scale=init_scale,
                seed=seed,
            ),
            activation=self.activation,
            use_bias=bool(use_bias),
            expert_dropout=_as_factor(where, "expert_dropout", expert_dropout, allow_none=False),
            dtype=self.dtype,
            aux_loss_coef=_as_factor(where, "aux_loss_coef", aux_loss_coef, allow_none=False),
            z_loss_coef=_as_factor(where, "z_loss_coef", z_loss_coef, allow_none=False),
            device=self.device,
        )
        self._impl = _core.SwitchFFN(
            _as_int(where, "d_model", d_model),
            _as_int(where, "d_ff", d_ff),
            _as_int(where, "num_experts", num_experts),
            options,
            comm_impl,
        )
        self._live_grads = dict(self._impl.tensors(True)) if self.device == "cpu" else None
        self.first_expert = self._impl.first_expert
        self.local_experts = self._impl.local_experts

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        """Apply the layer.

        Parameters
        ----------
        x : ndarray of float32 or bfloat16, shape (T, d_model)
            T >= 1; under expert parallelism T may differ between ranks and may be 0.
        training : bool
            Jitter, expert dropout and ``capacity_factor`` (else ``eval_capacity_factor``).

        Returns
        -------
        y : ndarray, shape (T, d_model), dtype of ``x``
        """
        return self._impl.forward(x, bool(training))

    __call__ = forward

    def backward(self, dy: np.ndarray) -> np.ndarray:
        """Differentiate ``sum(dy * y) + aux_loss + z_loss`` of the last forward.

        Parameters
        ----------
        dy : ndarray, shape (T, d_model), dtype of the forward's ``x``

        Returns
        -------
        dx : ndarray, shape (T, d_model), dtype of the forward's ``x``; writes ``grads``.

        Raises
        ------
        pyswitch.Error
            If no forward preceded it.
        """
        return self._impl.backward(dy)

    @property
    def aux_loss(self) -> float:
        return self._impl.aux_loss

    @property
    def z_loss(self) -> float:
        return self._impl.z_loss

    @property
    def last_plan(self):
        return self._impl.last_plan

    def stats(self) -> dict:
        """Routing statistics of the last forward.

        Returns
        -------
        dict
            ``tokens_per_expert`` int64 (E,) before capacity, ``drop_fraction`` (dropped
            assignments / (T * k)), ``router_entropy`` (mean over tokens of -sum p log p, nats).
        """
        s = self._impl.stats()
        return {
            "tokens_per_expert": s.tokens_per_expert,
            "drop_fraction": s.drop_fraction,
            "router_entropy": s.router_entropy,
        }


class DenseFFN(_FFNLayer):
    """The dense FFN with the interface of :class:`SwitchFFN`: every token through one FFN.

    ``y = act(x @ w_in + b_in) @ w_out + b_out``. With ``d_ff`` equal to the Switch layer's, it
    is the FLOP-matched baseline of a top-1 Switch layer.

    Parameters
    ----------
    d_model, d_ff : int
    activation : {"relu", "gelu", "geglu"}
    use_bias : bool
    dropout : float
        On the hidden activation, training only.
    dtype : {"float32", "bfloat16"}
    init_scale : float
    seed : int
    device : {"cpu", "cuda"}
        Where the layer runs. "cuda" keeps parameters, gradients and activations on the GPU
        (one device, no ``comm``): ``forward``/``backward`` copy NumPy arrays in and out, and
        ``params``/``grads`` are read-only host copies. Raises :class:`pyswitch.DeviceError`
        where CUDA is not available (see :func:`pyswitch.cuda.is_available`).

    Attributes
    ----------
    params, grads : dict of float32 ndarray
        ``w_in`` (d_model, d_ff), ``w_out`` (d_ff, d_model), and ``w_gate``, ``b_in`` (d_ff,),
        ``b_out`` (d_model,) when present. Live (``params``: new views on every access, as in
        :class:`SwitchFFN`).
    aux_loss, z_loss : float
        Always 0.0 (no router).
    """

    aux_loss = 0.0
    z_loss = 0.0

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        *,
        activation: str = "relu",
        use_bias: bool = False,
        dropout: float = 0.0,
        dtype: str = "float32",
        init_scale: float = 0.1,
        seed: int = 0,
        device: str = "cpu",
    ):
        where = "DenseFFN"
        self.dtype = _as_str(where, "dtype", dtype, _DTYPES)
        self.activation = _as_str(where, "activation", activation, _ACTIVATIONS)
        self.device = _as_device(where, device)
        options = _core.DenseFFNOptions(
            activation=self.activation,
            use_bias=bool(use_bias),
            dropout=_as_factor(where, "dropout", dropout, allow_none=False),
            dtype=self.dtype,
            init_scale=_as_factor(where, "init_scale", init_scale, allow_none=False),
            seed=_as_seed(where, seed),
            device=self.device,
        )
        self._impl = _core.DenseFFN(
            _as_int(where, "d_model", d_model), _as_int(where, "d_ff", d_ff), options
        )
        self._live_grads = dict(self._impl.tensors(True)) if self.device == "cpu" else None

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        """Apply the layer: x (T, d_model) float32 or bfloat16 -> y of the same shape and dtype."""
        return self._impl.forward(x, bool(training))

    __call__ = forward

    def backward(self, dy: np.ndarray) -> np.ndarray:
        """Differentiate ``sum(dy * y)``; returns dx (dtype of the forward's x), writes grads."""
        return self._impl.backward(dy)
