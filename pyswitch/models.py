"""The Switch Transformer language model (forward and backward in the C++ core).

A decoder-only byte-level model (vocabulary 256): token embedding tied with the output head,
rotary positions (RoPE, base 10000, no learned position table, so any sequence length works),
pre-norm RMSNorm blocks of causal multi-head self-attention and an FFN that is a Switch layer
every ``expert_every`` layers (the paper's "every other FFN layer" at 2) and dense otherwise, a
final RMSNorm and a float32 softmax cross-entropy. ``num_experts=0`` makes every FFN dense: the
FLOP-matched baseline of a top-1 Switch model (the same d_ff, so the same FLOPs per token).

Loss = CE + sum over Switch layers of ``aux_loss_coef * aux + z_loss_coef * z``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from . import _core
from .routing import _as_device, _as_factor
from .runtime import _as_int, _as_seed


@dataclasses.dataclass
class SwitchLMConfig:
    """Sizes and options of :class:`SwitchLM` (defaults: the ``pyswitch train`` model)."""

    vocab_size: int = 256
    d_model: int = 256
    num_layers: int = 4
    num_heads: int = 4
    d_ff: int = 1024
    num_experts: int = 8
    k: int = 1
    capacity_factor: float | None = 1.25
    eval_capacity_factor: float | None = 2.0
    expert_every: int = 2
    dtype: str = "float32"
    aux_loss_coef: float = 1e-2
    z_loss_coef: float = 1e-3
    jitter_eps: float = 1e-2
    init_scale: float = 0.1
    rope_base: float = 10000.0
    norm_eps: float = 1e-6
    seed: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SwitchLMConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"SwitchLMConfig: unknown keys {unknown}")
        return cls(**data)

    @property
    def dense(self) -> bool:
        return self.num_experts == 0


class SwitchLM:
    """The language model. Parameters are float32 masters owned by the core.

    Parameters
    ----------
    config : SwitchLMConfig
    device : {"cpu", "cuda"}
        Where the model runs; "cuda" raises :class:`pyswitch.DeviceError` in this version.
    comm : pyswitch.comm.Communicator, optional
        Expert parallelism for the Switch layers (``num_experts`` divisible by the ranks); the
        other parameters are replicated. See "Gradient scale" in :mod:`pyswitch.comm`: pass the
        global token count as ``loss_tokens`` and sum the replicated gradients over ranks.

    Attributes
    ----------
    params, grads : dict of str -> float32 ndarray
        Live views, in a fixed order: ``embed`` (V, d), per layer ``layers.{l}.attn_norm``,
        ``w_qkv`` (d, 3d), ``w_o``, ``ffn_norm``, ``ffn.w_in``, ``ffn.w_out`` (and
        ``ffn.router`` (d, E) in Switch layers, whose expert tensors are (E_local, ...)), and
        ``final_norm``. ``params`` is a new dict of new views on every access: in bfloat16
        the FFN matrices have a bf16 compute copy that every forward re-rounds while a view of
        them is alive (it may have been written), and reuses once none is, so hold ``params``
        only while you need it.
    expert_params : set of str
        The tensors sharded over ranks (never all-reduced).
    decay_params : set of str
        The tensors weight decay applies to (the matrices).
    """

    def __init__(self, config: SwitchLMConfig | None = None, comm=None, *, device: str = "cpu"):
        c = config or SwitchLMConfig()
        where = "SwitchLM"
        comm_impl = None
        if comm is not None:
            from .comm import Communicator

            if not isinstance(comm, Communicator):
                raise TypeError(
                    f"{where}: comm must be a pyswitch.comm.Communicator or None, "
                    f"got {type(comm).__name__}"
                )
            comm_impl = comm._impl
        self.config = c
        self.comm = comm
        config = _core.SwitchLMConfig(
            vocab_size=_as_int(where, "vocab_size", c.vocab_size),
            d_model=_as_int(where, "d_model", c.d_model),
            num_layers=_as_int(where, "num_layers", c.num_layers),
            num_heads=_as_int(where, "num_heads", c.num_heads),
            d_ff=_as_int(where, "d_ff", c.d_ff),
            num_experts=_as_int(where, "num_experts", c.num_experts),
            k=_as_int(where, "k", c.k),
            capacity_factor=_as_factor(
                where, "capacity_factor", c.capacity_factor, allow_none=True
            ),
            eval_capacity_factor=_as_factor(
                where, "eval_capacity_factor", c.eval_capacity_factor, allow_none=True
            ),
            expert_every=_as_int(where, "expert_every", c.expert_every),
            dtype=c.dtype,
            aux_loss_coef=_as_factor(where, "aux_loss_coef", c.aux_loss_coef, allow_none=False),
            z_loss_coef=_as_factor(where, "z_loss_coef", c.z_loss_coef, allow_none=False),
            jitter_eps=_as_factor(where, "jitter_eps", c.jitter_eps, allow_none=False),
            init_scale=_as_factor(where, "init_scale", c.init_scale, allow_none=False),
            rope_base=_as_factor(where, "rope_base", c.rope_base, allow_none=False),
            norm_eps=_as_factor(where, "norm_eps", c.norm_eps, allow_none=False),
            seed=_as_seed(where, c.seed),
            device=_as_device(where, device),
        )
        self._impl = _core.SwitchLM(config, comm_impl)
        self.grads = {}
        self.expert_params, self.decay_params = set(), set()
        # The master views are not kept (see ``params``).
        for name, _data, grad, expert, decay in self._impl.parameters():
            self.grads[name] = grad
            if expert:
                self.expert_params.add(name)
            if decay:
                self.decay_params.add(name)

    @property
    def params(self) -> dict:
        """Live float32 views of the master parameters, made on each access (see the class
        docstring)."""
        return {name: data for name, data, *_ in self._impl.parameters()}

    @property
    def training_steps(self) -> int:
        """The random state: training forwards so far (jitter and dropout draws are indexed by
        it). Checkpoints save it; restoring it makes a resumed run continue bit for bit."""
        return int(self._impl.training_steps)

    @training_steps.setter
    def training_steps(self, steps: int) -> None:
        self._impl.training_steps = _as_int("SwitchLM", "training_steps", steps)

    @property
    def num_parameters(self) -> int:
        """This rank's parameter count."""
        return int(self._impl.num_parameters)

    @property
    def switch_layers(self) -> list[int]:
        return [i for i in range(self.config.num_layers) if self._impl.is_switch_layer(i)]

    def _tokens(self, where: str, tokens) -> np.ndarray:
        if not isinstance(tokens, np.ndarray):
            raise TypeError(f"{where}: tokens must be a numpy array, got {type(tokens).__name__}")
        if tokens.dtype.kind not in "iu":
            raise TypeError(f"{where}: tokens must be integers, got {tokens.dtype}")
        if tokens.size and (tokens.dtype.itemsize > 4 or tokens.dtype == np.uint32):
            # Range-check before the int32 cast, which would wrap 2**32 + 65 onto 65.
            low, high = int(tokens.min()), int(tokens.max())
            if low < 0 or high >= self.config.vocab_size:
                bad = low if low < 0 else high
                raise ValueError(
                    f"{where}: token {bad} is outside the vocabulary [0, {self.config.vocab_size})"
                )
        return np.ascontiguousarray(tokens, dtype=np.int32)

    def loss_and_grad(self, tokens: np.ndarray, *, loss_tokens: int | None = None) -> dict:
        """Training step's forward and backward on tokens (B, S + 1): inputs ``[:, :-1]``,
        targets ``[:, 1:]``. Writes ``grads``.

        loss_tokens: the token count the cross-entropy is averaged over (default B * S; under
        data parallelism the global count). Returns ``{"ce", "aux", "z", "total", "tokens"}``.
        """
        tokens = self._tokens("SwitchLM.loss_and_grad", tokens)
        if loss_tokens is None:
            loss_tokens = tokens.shape[0] * (tokens.shape[1] - 1) if tokens.ndim == 2 else 1
        return self._impl.step(
            tokens, True, True, _as_int("loss_and_grad", "loss_tokens", loss_tokens)
        )

    def loss(self, tokens: np.ndarray, *, training: bool = False) -> dict:
        """Forward only (eval mode unless ``training``); the mean CE over B * S targets."""
        tokens = self._tokens("SwitchLM.loss", tokens)
        n = tokens.shape[0] * (tokens.shape[1] - 1) if tokens.ndim == 2 else 1
        return self._impl.step(tokens, bool(training), False, max(n, 1))

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        """float32 logits (B, S, V) of the inputs tokens (B, S), eval mode."""
        return self._impl.logits(self._tokens("SwitchLM.logits", tokens))

    def stats(self) -> list[dict]:
        """Per Switch layer, the last forward's routing: tokens per expert, drop fraction,
        router entropy."""
        return [
            {
                "tokens_per_expert": s.tokens_per_expert,
                "drop_fraction": s.drop_fraction,
                "router_entropy": s.router_entropy,
            }
            for s in self._impl.switch_stats()
        ]

    def generate(
        self,
        prompt: bytes,
        max_new_tokens: int = 200,
        *,
        temperature: float = 0.8,
        top_k: int | None = 40,
        seed: int = 0,
        context: int = 256,
    ) -> bytes:
        """Sample bytes after ``prompt`` (temperature 0: greedy). Deterministic in ``seed``."""
        where = "SwitchLM.generate"
        if not isinstance(prompt, (bytes, bytearray)):
            raise TypeError(f"{where}: prompt must be bytes, got {type(prompt).__name__}")
        if isinstance(temperature, bool) or not (
            isinstance(temperature, (int, float)) and temperature >= 0
        ):
            raise ValueError(f"{where}: temperature must be a number >= 0, got {temperature!r}")
        if top_k is not None and (
            isinstance(top_k, bool) or not (isinstance(top_k, int) and top_k >= 1)
        ):
            raise ValueError(f"{where}: top_k must be None or an int >= 1, got {top_k!r}")
        if _as_int(where, "max_new_tokens", max_new_tokens) < 0:
            raise ValueError(f"{where}: max_new_tokens must be >= 0, got {max_new_tokens}")
        if _as_int(where, "context", context) < 1:
            raise ValueError(f"{where}: context must be >= 1, got {context}")
        rng = np.random.default_rng(seed)
        out = bytearray(prompt or b"\n")
        for _ in range(_as_int(where, "max_new_tokens", max_new_tokens)):
            window = np.frombuffer(bytes(out[-context:]), dtype=np.uint8).astype(np.int32)
            logits = self.logits(window[None, :])[0, -1].astype(np.float64)
            if temperature == 0:
                nxt = int(np.argmax(logits))
            else:
                logits = logits / temperature
                if top_k is not None and top_k < logits.size:
                    cut = np.partition(logits, -top_k)[-top_k]
                    logits = np.where(logits >= cut, logits, -np.inf)
                p = np.exp(logits - logits.max())
                p /= p.sum()
                nxt = int(rng.choice(p.size, p=p))
            out.append(nxt)
        return bytes(out[len(prompt) :] if prompt else out[1:])
