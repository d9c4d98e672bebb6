"""What one piece of work launches, counted on any device: the PyTorch kernels the dispatcher runs and the
Triton kernels launched, by name, in order.

    with LaunchCounter() as counted:
        decode_step(model, ids, pos, cache)
    counted.triton, counted.torch   # ['_decode_qkv_kernel', ...], ['embedding', 'mm', ...]

Views, metadata and allocations are not launches and are left out; so are the PyTorch ops the Triton
interpreter runs inside a kernel (TRITON_INTERPRET=1 executes kernels with PyTorch on the CPU). Host
synchronisations show up among the PyTorch ops as `_local_scalar_dense` (`.item()`, `int(t)`), and
data-dependent shapes as `nonzero` or `masked_select`; SYNCS lists them. Used by the launch-count tests
(tests/test_decode_kernels.py) and by benchmarks/bench_e2e.py's per-token kernel counts.
"""

from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode

FREE = frozenset({
    "view", "_unsafe_view", "transpose", "t", "expand", "select", "slice", "unsqueeze", "squeeze", "as_strided",
    "detach", "alias", "empty", "empty_like", "reshape", "permute", "lift_fresh", "_to_copy_noop",
})  # fmt: skip
SYNCS = frozenset({"_local_scalar_dense", "nonzero", "item", "masked_select", "index_put_"})


def jit_function(kernel):
    """The @triton.jit function a launched kernel object runs: Triton's Autotuner and Heuristics wrap it."""
    from triton.runtime.autotuner import Autotuner, Heuristics

    while isinstance(kernel, (Autotuner, Heuristics)):
        kernel = kernel.fn
    return kernel


def autotune_configs(tuner, args: tuple, kwargs: dict) -> list:
    """The configs Triton's Autotuner `tuner` will time for a launch with these arguments: its own pruning,
    which reads the launch's named arguments from `tuner.nargs` (set for the call, as Autotuner.run does)."""
    tuner.nargs = dict(zip(tuner.arg_names, args))
    try:
        return tuner.prune_configs(dict(kwargs))
    finally:
        tuner.nargs = None


class LaunchCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.torch: list[str] = []
        self.triton: list[str] = []
        self._inside = 0  # > 0 while a Triton kernel runs (the interpreter's own PyTorch ops)

    def __enter__(self):
        from triton.runtime.jit import KernelInterface

        self._launch = KernelInterface.__getitem__
        counter, launch = self, self._launch

        def counting(kernel, grid):
            run = launch(kernel, grid)

            def call(*args, **kwargs):
                fn = jit_function(kernel)
                counter.triton.append(getattr(fn, "__name__", type(fn).__name__))
                counter._inside += 1
                try:
                    return run(*args, **kwargs)
                finally:
                    counter._inside -= 1

            return call

        KernelInterface.__getitem__ = counting
        return super().__enter__()

    def __exit__(self, *exc):
        from triton.runtime.jit import KernelInterface

        KernelInterface.__getitem__ = self._launch
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        out = func(*args, **(kwargs or {}))
        same_dtype = name == "_to_copy" and getattr(args[0], "dtype", None) == getattr(out, "dtype", None)
        if not self._inside and name not in FREE and not same_dtype:
            self.torch.append(name)
        return out

    @property
    def syncs(self) -> list[str]:
        return [name for name in self.torch if name in SYNCS]
