"""The compile gate (tests/compile_gate.py) in the suite: every Triton kernel compiles without a GPU, no
bf16 variant spills, shared memory fits, and the decode configurations of the grouped MXFP4 matmul meet
the static bandwidth goal. It runs in a subprocess because the rest of the suite imports the kernels under
TRITON_INTERPRET=1, where @triton.jit compiles nothing.

What the suite compiles: every kernel, mode, dtype and autotune tile for sm_90a (the H100 and H200 this
project runs on), on the newest Triton and on the one the GPU machines' PyTorch ships; for sm_100a
(Blackwell), every kernel but the grouped MoE matmuls' autotune sweep, on the newest. That sweep for
sm_100a (about 100 variants, 45% of the gate's compile time: the suite is held to 10 minutes on two
cores) is in `make gate`, which compiles everything for both targets."""

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

GATE = Path(__file__).with_name("compile_gate.py")
# SASS instructions per decoded weight element in the main loop, per thread. H100 issues 128
# thread-instructions per SM and cycle while HBM brings ~30 FP4 values per SM and cycle: about 4
# instructions per value keep pace with memory; 6 leaves room for the loop's fixed costs.
DECODE_BUDGET = 6.0
# the grouped MoE kernels of gptoss.kernels.moe (gate_up, down and their backward products)
MOE_KERNELS = ("_moe_gate_up_kernel", "_moe_down_kernel", "_moe_down_bwd_kernel", "_moe_gate_up_bwd_kernel")


# The Triton that the GPU machine's PyTorch ships (2.11: 3.6), older than the newest: a tile that compiles
# clean on one can fail to lower or spill on the other, so the gate runs on both.
GPU_TRITON = "3.6.0"


def side_triton(version: str) -> Path:
    """triton==version installed into a folder of its own under the cache (once), for PYTHONPATH."""
    side = Path(os.environ.get("GPTOSS_CACHE", Path.home() / ".cache" / "gptoss")) / f"triton-{version}"
    if (side / "triton" / "__init__.py").exists():
        return side
    side.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=side.name + ".", dir=side.parent))  # renamed into place when complete
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-deps",
            "--target",
            str(tmp),
            f"triton=={version}",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if done.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(
            f"triton=={version} could not be installed into {side} (is the package registry reachable?): {last}"
        )
    try:
        tmp.rename(side)
    except OSError:  # another run put it there first
        shutil.rmtree(tmp, ignore_errors=True)
    return side


def compiling(*args: str, path: Path | None = None) -> subprocess.CompletedProcess:
    """`python *args` in a fresh process that compiles (the suite imports the kernels under
    TRITON_INTERPRET=1) with no pinned MoE config; `path` goes first on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "GPTOSS_MOE_CONFIG")}
    if path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(path), *filter(None, [env.get("PYTHONPATH")])])
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env)


SUITE_RUNS = (("--targets", "90"), ("--targets", "100", "--skip", "_moe_"))  # the module docstring says why


@pytest.fixture(scope="module")
def gate(tmp_path_factory):
    runs, rows = [], []
    for i, flags in enumerate(SUITE_RUNS):
        out = tmp_path_factory.mktemp("gate") / f"rows-{i}.json"
        done = compiling(str(GATE), *flags, "--json", str(out))
        print(done.stdout)  # the table, shown with pytest -s
        runs.append(done)
        rows += json.loads(out.read_text()) if out.exists() else []
    return runs, rows


def test_every_kernel_compiles_without_spills(gate):
    runs, rows = gate
    for done in runs:
        assert done.returncode == 0, done.args[2:] + [done.stdout[-3000:] + done.stderr[-3000:]]
    assert rows and all("error" not in row for row in rows)
    kernels = {row["kernel"] for row in rows}
    assert set(MOE_KERNELS) | {"_mxfp4_dequant_fwd_kernel", "_topk_softmax_fwd_kernel"} <= kernels
    assert {
        "_attn_fwd_kernel",
        "_attn_bwd_dq_kernel",
        "_attn_bwd_dkdv_kernel",
        "_attn_decode_kernel",
        "_attn_decode_merge_kernel",
    } <= kernels
    assert {row["target"] for row in rows} == {"sm_90a", "sm_100a"}
    on_blackwell = {row["kernel"] for row in rows if row["target"] == "sm_100a"}
    assert not on_blackwell & set(MOE_KERNELS) and on_blackwell >= {"_attn_fwd_kernel", "_decode_down_kernel"}


def test_inference_launches_the_tiles_training_compiles(gate):
    # gate_up keeps h for the backward or not by a runtime flag: a prefill without gradients runs the very
    # tiles the training workloads compile (a constexpr would double them, each half gated apart)
    _, rows = gate
    gate_up = [r for r in rows if r["kernel"] == "_moe_gate_up_kernel" and not r["config"]["ADD"]]
    assert gate_up
    for r in gate_up:
        assert {"forward", "inference"} <= {launch["what"] for launch in r["launches"]}, r["config"]


def test_decode_configs_meet_the_instruction_budget(gate):
    _, rows = gate
    decode = [
        r
        for r in rows
        if r["kernel"] in MOE_KERNELS
        and r["target"] == "sm_90a"
        and r["config"]["BLOCK_M"] == 16
        and not r["config"]["UPCAST"]
    ]
    assert {r["kernel"] for r in decode} == set(MOE_KERNELS)  # every kernel has decode configurations
    for r in decode:
        assert r["spill_bytes"] == 0 and r["mma"] == "mma.sync"
        assert r["per_element"] <= DECODE_BUDGET, f"{r['config']}: {r['per_element']:.2f} instructions per element"
    # at one token the 4 routed experts must give every one of the 132 SMs a program
    for r in decode:
        grids = [math.prod(launch["grid"]) for launch in r["launches"] if launch["workload"] == "decode"]
        if r["config"]["BLOCK_N"] <= 64:
            assert min(grids) >= 132, (r["config"], grids)


def _prefill_tiles(rows) -> list[dict]:
    """The grouped MoE kernels' tiles of 64+ rows (prefill and training), bf16, sm_90a."""
    return [
        r
        for r in rows
        if r["kernel"] in MOE_KERNELS
        and r["target"] == "sm_90a"
        and r["config"]["BLOCK_M"] >= 64
        and not r["config"]["UPCAST"]
    ]


def test_prefill_configs_use_wgmma(gate):
    _, rows = gate
    big = _prefill_tiles(rows)
    assert big and all(r["mma"] == "wgmma" for r in big)
    _prefill_tiles_stream(rows)


def test_tensor_core_tiles_keep_a_trip_of_copies_in_flight(gate):
    _copies_stay_in_flight(gate[1])


def _copies_stay_in_flight(rows):
    """Every bf16 tile of the grouped MoE kernels and of attention's training kernels, sm_90a: the loop
    waits for its asynchronous copies to shared memory with the next trip's still in flight. With two
    stages a loop issues the next trip's copies after its product and waits for them at the top of that
    trip (DEPBAR.LE SB0, 0x0): the whole latency of memory in every trip, hidden only by other blocks on
    the SM, of which attention's 128 x 128 tiles have none. The instruction count does not show it."""
    kernels = {*MOE_KERNELS, *SCORE_MACS}  # SCORE_MACS: attention's training kernels
    tiles = [
        r
        for r in rows
        if r["kernel"] in kernels
        and r["target"] == "sm_90a"
        and {launch["dtype"] for launch in r["launches"]} == {"bfloat16"}
    ]
    assert {r["kernel"] for r in tiles} == kernels
    for r in tiles:
        assert r["loop_copies_ahead"] is not None and r["loop_copies_ahead"] >= 1, (
            r["kernel"],
            r["config"],
            r["loop_copies_ahead"],
        )


def _prefill_tiles_stream(rows):
    """The grouped MoE kernels' wgmma tiles (64+ rows, prefill and training), bf16 on sm_90a: no global
    load of the main loop is waited on in the trip that issues it (the E8M0 scales, one byte a block,
    are too small for the asynchronous copies that bring the codes and activations, so they come a trip
    ahead), and the 128 x 128 forward tiles decode a weight element in at most BLOCK_M / 16 = 8 SASS
    instructions: an SM issues 128 thread-instructions a cycle and its tensor cores do 2,048 bf16 MACs,
    so a trip's instructions then take no longer to issue than its BLOCK_M MACs per element take."""
    tiles = _prefill_tiles(rows)
    assert tiles
    for r in tiles:
        assert r["loop_loads_waited"] == 0, (r["kernel"], r["config"], r["loop_loads_waited"], r["loop_loads"])
    forward = ("_moe_gate_up_kernel", "_moe_down_kernel")
    square = [r for r in tiles if r["kernel"] in forward and r["config"]["BLOCK_M"] == r["config"]["BLOCK_N"] == 128]
    assert {r["kernel"] for r in square} == set(forward)
    for r in square:
        assert r["per_element"] <= r["config"]["BLOCK_M"] / 16, (r["kernel"], r["config"], r["per_element"])

    # 64 x 128 tiles on one warpgroup (gate_up, down, gate_up_bwd): a trip's fixed costs paid by 4 warps,
    # not 8, so fewer instructions an element than the 8-warp 64 x 128 x 64 tile, and still two or more
    # blocks an SM, so that one block decodes while another's product runs (an unswapped block waits for
    # its own each trip). And K = 128 a trip in the backward (8 warps): fewer than K = 64 too
    from gptoss.kernels.moe import tile_of

    def tile(r):  # as CONFIGS writes it, stages left out: (M, N, K, warps), then 1 if swapped
        t = tile_of(r["config"])
        return t[:4] + t[5:]

    for kernel in (*forward, "_moe_gate_up_bwd_kernel", "_moe_down_bwd_kernel"):
        for add in (False, True):
            mine = [r for r in tiles if r["kernel"] == kernel and r["config"]["ADD"] == add]
            (eight,) = [r for r in mine if tile(r) == (64, 128, 64, 8)]
            one_group = [r for r in mine if tile(r) in ((64, 128, 64, 4), (64, 128, 128, 4))]
            wide_k = [r for r in mine if tile(r) == (64, 128, 128, 8)]
            expected = {"_moe_down_bwd_kernel": (0, 1), "_moe_gate_up_bwd_kernel": (2, 0)}.get(kernel, (1, 1))
            assert (len(one_group), len(wide_k)) == expected, (kernel, add, [tile(r) for r in mine])
            for r in one_group:
                assert r["blocks_per_sm"] >= 2, (kernel, r["config"], r["registers"], r["shared"])
            for r in one_group + wide_k:
                assert r["per_element"] < eight["per_element"], (
                    kernel,
                    r["config"],
                    r["per_element"],
                    eight["per_element"],
                )
    # swapped tiles (the decoded tile as wgmma's register operand): the loop never waits for all of its
    # products, so the tensor cores still work while the next trip loads and decodes
    swapped = [r for r in tiles if r["config"].get("SWAP")]
    assert {r["kernel"] for r in swapped} == set(MOE_KERNELS)
    for r in swapped:
        assert r["loop_wgmma_pending"] is not None and r["loop_wgmma_pending"] >= 1, (r["kernel"], r["config"])


def test_a_kernel_outside_the_workloads_fails_the_gate(tmp_path):
    # a new kernel file that no workload launches must not slip through
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import sys, types, triton, triton.language as tl\n"
        f"sys.path.insert(0, {str(GATE.parent)!r})\n"
        "import compile_gate, gptoss.kernels.routing as routing\n"
        "@triton.jit\n"
        "def _orphan_kernel(x_ptr, BLOCK: tl.constexpr):\n"
        "    tl.store(x_ptr + tl.arange(0, BLOCK), tl.zeros([BLOCK], tl.float32))\n"
        "_orphan_kernel.__module__ = routing.__name__\n"
        "routing._orphan_kernel = _orphan_kernel\n"
        "print(compile_gate.escaped(compile_gate.discover(), compile_gate.run_workloads()))\n"
    )
    done = compiling(str(probe))
    assert done.stdout.strip() == "['routing._orphan_kernel']", done.stdout + done.stderr[-2000:]


def test_a_compile_error_in_a_helper_is_reported_with_its_reason_and_line(tmp_path):
    # Triton wraps an error raised in an inlined helper in one for each caller, whose text is only the call's
    # position: the gate's row must carry the reason and the helper's line, not "at 2:8:"
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import sys, torch, triton, triton.language as tl\n"
        f"sys.path.insert(0, {str(GATE.parent)!r})\n"
        "import compile_gate\n"
        "@triton.jit\n"
        "def _widen(x, BLOCK: tl.constexpr):\n"
        "    return tl.reshape(x, (BLOCK + 1,))\n"
        "@triton.jit\n"
        "def _bad_kernel(x_ptr, BLOCK: tl.constexpr):\n"
        "    v = _widen(tl.load(x_ptr + tl.arange(0, BLOCK)), BLOCK)\n"
        "    tl.store(x_ptr + tl.arange(0, BLOCK), v)\n"
        "x = torch.empty(16, device='meta')\n"
        "(variant,) = compile_gate.expand(compile_gate.Launch(_bad_kernel, (1,), (x,), {'BLOCK': 16}, {}), 90)\n"
        "row, cubin = compile_gate.compile_one(variant)\n"
        "print(cubin is None, row['error'])\n"
    )
    done = compiling(str(probe))
    out = done.stdout.strip()
    assert out.startswith("True "), out + done.stderr[-2000:]
    assert "must be a power of 2" in out and "return tl.reshape(x, (BLOCK + 1,))" in out, out
    assert "\n" not in out and len(out) <= 306, out


HOSTILE_ARGS = [
    (["--targets", "abc"], "compute capabilities such as 90,100"),
    (["--targets", ""], "compute capabilities such as 90,100"),
    (["--targets", "0"], "compiles for 90"),
    (["--targets", "-90"], "compiles for 90"),
    (["--targets", "80"], "compiles for 90"),  # no shared-memory limit is known to the gate there
    (["--targets", "nan"], "compute capabilities such as 90,100"),
    (["--jobs", "0"], "at least 1 process"),
    (["--jobs", "-2"], "at least 1 process"),
    (["--jobs", "two"], "whole number of processes"),
    (["--jobs", "1e9"], "whole number of processes"),
    (["--jobs"], "expected one argument"),
    (["--json", "/"], "give a file path in an existing folder"),  # a folder: it used to fail after the whole run
    (["--json", "/nonexistent-folder/rows.json"], "give a file path in an existing folder"),
    (["--only", ""], "kernel-name prefixes such as _decode_"),
    (["--only", "_decode_,"], "kernel-name prefixes such as _decode_"),
    (["--only", "no_such_kernel"], "matches no kernel of gptoss.kernels"),
    (["--only"], "expected one argument"),
    (["--skip", ""], "kernel-name prefixes such as _decode_"),
    (["--skip", ",_moe_"], "kernel-name prefixes such as _decode_"),
    (["--skip", "no_such_kernel"], "--skip no_such_kernel: matches no kernel"),
    (["--skip"], "expected one argument"),
    (["--only", "_moe_", "--skip", "_moe"], "leaves no kernel to compile"),
]


def test_the_gate_imported_first_leaves_the_interpreted_kernels_working():
    # a test that imports the gate (which clears TRITON_INTERPRET for its own compiling) before anything
    # imported Triton: the suite's kernels, which call Triton's own @jit helpers (tl.sum), still interpret
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "import os, conftest, compile_gate, torch\n"  # the suite's setting, then the gate
        "os.environ['TRITON_INTERPRET'] = '1'\n"  # put back, as _meet_the_static_goals does
        "from gptoss.kernels.rmsnorm import rmsnorm\n"
        "y = rmsnorm(torch.ones(2, 64), torch.full((64,), 2.0), 1e-6)\n"
        "assert torch.allclose(y, torch.full((2, 64), 2.0)), y\n"
        "print('interpreted')\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(GATE.parent)], capture_output=True, text=True, env=env)
    assert done.returncode == 0 and "interpreted" in done.stdout, done.stderr[-2000:]


def test_hostile_arguments_are_refused_in_one_line():
    # one subprocess for all rows: each row's exit code and stderr, from argparse's own exit
    script = (
        "import contextlib, io, json, sys\n"
        f"sys.path.insert(0, {str(GATE.parent)!r})\n"
        "import compile_gate\n"
        "out = []\n"
        f"for argv in {[a for a, _ in HOSTILE_ARGS]!r}:\n"
        "    err = io.StringIO()\n"
        "    with contextlib.redirect_stderr(err):\n"
        "        try:\n"
        "            compile_gate.main(argv)\n"
        "            code = 0\n"
        "        except SystemExit as e:\n"
        "            code = e.code\n"
        "    out.append([code, err.getvalue()])\n"
        "print(json.dumps(out))\n"
    )
    done = compiling("-c", script)
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for (argv, message), (code, err) in zip(HOSTILE_ARGS, results):
        assert code == 2, (argv, code, err)
        assert message in err and "Traceback" not in err, (argv, err)


def test_attention_uses_tensor_cores_without_spills(gate):
    # the training kernels tile 64-128 rows onto wgmma; the decode kernel's 16-row tile onto mma.sync; the
    # backward's preamble (a row sum of dO * O) and the decode's merge multiply no matrices
    _, rows = gate
    attention = [r for r in rows if r["kernel"].startswith("_attn_") and r["target"] == "sm_90a"]
    bf16 = [r for r in attention if {launch["dtype"] for launch in r["launches"]} == {"bfloat16"}]
    assert {r["kernel"] for r in bf16} >= {
        "_attn_fwd_kernel",
        "_attn_bwd_dq_kernel",
        "_attn_bwd_dkdv_kernel",
        "_attn_decode_kernel",
    }
    for r in attention:
        assert r["spill_bytes"] == 0 and r["spill_ops"] == 0, (r["kernel"], r["config"])
    for r in bf16:
        expected = {
            "_attn_decode_kernel": "mma.sync",
            "_attn_decode_merge_kernel": "FMA",
            "_attn_bwd_delta_kernel": "FMA",
        }
        expected = expected.get(r["kernel"], "wgmma")
        assert r["mma"] == expected, (r["kernel"], r["mma"])
    _attention_trips_keep_pace(rows)


# tensor-core MACs a score element takes in each training kernel at head dim 64: the forward's two products
# (Q K^T, P V), dQ's three (Q K^T again, dO V^T, dS K), dK/dV's four (K Q^T, P^T dO, V dO^T, dS^T Q)
SCORE_MACS = {"_attn_fwd_kernel": 128, "_attn_bwd_dq_kernel": 192, "_attn_bwd_dkdv_kernel": 256}


def _attention_trips_keep_pace(rows):
    """The training attention kernels, bf16 on sm_90a: SASS instructions a score element in the loop.
    An SM issues 128 thread-instructions a cycle and its tensor cores do 2,048 bf16 MACs, so a trip issues
    no slower than its products run at MACs / 16 instructions a score: 8 forward, 12 dQ, 16 dK/dV. The
    backward kernels keep that pace on the tiles every row sees whole (the mask skipped: most tile pairs
    of a long causal row), and the forward, with its softmax, comes within 8.5 (its 128 x 64 tile took
    12-14: a 128-key tile halves a trip's fixed costs and the rescaling of the output a key; reducing each
    key tile's extreme positions every trip, where tile_ranges now says which tiles are seen whole, took
    10.5 on Triton 3.6, and reading the key positions on every trip 9.7); a masked trip takes at most 17 in
    all three (dK/dV reading the rows' positions on every trip took 18.7 on Triton 3.6; dividing its rows
    into (token, head) by a runtime G, 30)."""
    tiles = [
        r
        for r in rows
        if r["kernel"] in SCORE_MACS
        and r["target"] == "sm_90a"
        and {launch["dtype"] for launch in r["launches"]} == {"bfloat16"}
    ]
    assert {r["kernel"] for r in tiles} == set(SCORE_MACS), [r["kernel"] for r in tiles]
    for r in tiles:
        masked = r["per_element"]
        unmasked = masked * (1 - r["loop_skippable"] / r["main_loop"])
        pace = SCORE_MACS[r["kernel"]] / 16 if r["kernel"] != "_attn_fwd_kernel" else 8.5
        assert r["loop_skippable"] > 0, (r["kernel"], "no tile skips the per-score mask")
        assert unmasked <= pace and masked <= 17, (r["kernel"], r["config"], round(unmasked, 2), round(masked, 2))


def test_a_cached_row_never_outlives_its_compiler(tmp_path):
    # a tile that compiled clean on Triton 3.9 failed to lower on 3.6: the cache key names Triton and ptxas
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import json, sys, types, triton\n"
        f"sys.path.insert(0, {str(GATE.parent)!r})\n"
        "import compile_gate\n"
        "from triton.backends.compiler import GPUTarget\n"
        "from triton.compiler import make_backend\n"
        "variant = compile_gate.Variant('k', {}, {}, (1,), 90, types.SimpleNamespace(hash=lambda: 'src'), {'num_warps': 4})\n"
        "keys = {'first': variant.key, 'again': variant.key}\n"
        "version, triton.__version__ = triton.__version__, '0.0.1'\n"
        "keys['other_triton'] = variant.key\n"
        "triton.__version__ = version\n"
        "# Triton's CUDA backend hashes `ptxas --version` and the architecture\n"
        "type(make_backend(GPUTarget('cuda', 90, 32))).hash = lambda self: 'Cuda compilation tools, release 12.8'\n"
        "keys['other_ptxas'] = variant.key\n"
        "print(json.dumps(keys))\n"
    )
    done = compiling(str(probe))
    assert done.returncode == 0, done.stderr[-2000:]
    keys = json.loads(done.stdout.strip().splitlines()[-1])
    assert keys["first"] == keys["again"]
    assert len({keys["first"], keys["other_triton"], keys["other_ptxas"]}) == 3


ONE_DISASSEMBLY = """
import json, subprocess, sys, tempfile
sys.path.insert(0, sys.argv[1])
import compile_gate as gate

# kernels with a K loop of wgmma (two MoE tiles), attention's loop with its skippable masked part, one
# without a loop; two targets, several kernels each, so most sit at an offset in the shared binary
want = {"_moe_gate_up_kernel": 2, "_attn_fwd_kernel": 1, "_rmsnorm_fwd_kernel": 1}
picked = []
for launch in gate.run_workloads():
    name = gate._jit_of(launch.kernel).__name__
    if name not in want or launch.label["dtype"] != "bfloat16" or launch.label["workload"] != "prefill":
        continue
    for target in (90, 100):
        for variant in gate.expand(launch, target):
            if sum(v.name == name and v.target == target for v in picked) < want[name]:
                if name.startswith("_moe_") and target == 100:
                    continue
                picked.append(variant)
rows = gate.compile_batch(picked)
cubins = [gate.compile_one(variant)[1] for variant in picked]  # from Triton's cache
together = {}  # each target's kernels from one nvdisasm run, as the gate reads them
for target in (90, 100):
    mine = [i for i, variant in enumerate(picked) if variant.target == target]
    together.update(zip(mine, gate.disassemble([cubins[i] for i in mine], target)))
out = []
for i, (variant, row, cubin) in enumerate(zip(picked, rows, cubins)):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([gate._tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True).stdout
    code = [(int(a, 16), op, rest) for a, _, op, rest in gate._SASS_LINE.findall(sass)]
    alone = gate.sass_stats(code, gate.resource_usage(cubin), variant.config["num_warps"],
                            gate.trip_elements(variant.name, variant.config))
    start = together[i][0][0]  # the kernel's offset in the shared binary
    out.append(dict(
        kernel=variant.name, target=variant.target, alone=alone, batched={k: row.get(k) for k in alone},
        start=start, same_code=[(a, op) for a, op, _ in code] == [(a - start, op) for a, op, _ in together[i]],
    ))
print(json.dumps(out))
"""


def test_one_disassembly_of_many_kernels_reads_what_cuobjdump_reads_of_each(gate, tmp_path):
    # the gate reads every cubin's SASS from one nvdisasm run a batch (disassemble); each figure must be
    # the one cuobjdump -sass gives for that cubin alone (run after the gate: compiled from Triton's cache)
    script = tmp_path / "one.py"
    script.write_text(ONE_DISASSEMBLY)
    done = compiling(str(script), str(GATE.parent))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert sorted((f["kernel"], f["target"]) for f in found) == sorted(
        [("_moe_gate_up_kernel", 90)] * 2
        + [("_attn_fwd_kernel", 90), ("_rmsnorm_fwd_kernel", 90)]
        + [("_attn_fwd_kernel", 100), ("_rmsnorm_fwd_kernel", 100)]
    )
    for f in found:  # the same instructions at the same places, and the same figures read from them
        assert f["alone"]["instructions"] > 0 and f["same_code"] and f["batched"] == f["alone"], f
    assert sum(f["start"] > 0 for f in found) >= 3  # read from inside the shared binary, not only its start
    moe = [f["alone"] for f in found if f["kernel"].startswith("_moe_")]
    assert all(m["main_loop"] and m["mma"] == "wgmma" for m in moe)  # loops were found, not just counted
    assert any(f["alone"]["loop_skippable"] for f in found if f["kernel"] == "_attn_fwd_kernel")


def test_every_kernel_compiles_without_spills_on_the_gpu_machines_triton(tmp_path):
    # the Triton the GPU machines' PyTorch ships: every kernel for sm_90a (their H100 and H200), where the
    # fused decode tiles meet their static goals too, and the fused decode kernels for sm_100a as well
    side = side_triton(GPU_TRITON)
    rows = []
    for targets, only in (("90", ()), ("100", ("--only", "_decode_"))):
        out = tmp_path / f"rows-{targets}.json"
        done = compiling(str(GATE), "--targets", targets, *only, "--json", str(out), path=side)
        assert f"on Triton {GPU_TRITON} ({side / 'triton'})" in done.stdout, done.stdout[-1000:] + done.stderr[-2000:]
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        rows += json.loads(out.read_text())
    assert {row["target"] for row in rows} == {"sm_90a", "sm_100a"} and all("error" not in row for row in rows)
    assert {r["kernel"] for r in rows if r["target"] == "sm_100a"} >= {"_decode_gate_up_kernel", "_decode_down_kernel"}
    assert all(r["kernel"].startswith("_decode_") for r in rows if r["target"] == "sm_100a")
    _meet_the_static_goals(rows)
    _prefill_tiles_stream(rows)
    _attention_trips_keep_pace(rows)
    _copies_stay_in_flight(rows)


def test_fused_decode_kernels_stream_without_shared_memory_in_their_loops(gate):
    """The fused decode kernels (gptoss.kernels.decode) compile clean everywhere, and the two that
    stream MXFP4 experts do it in registers: no barrier or shared-memory move in their main loop (a
    layout conversion there makes every K step wait), within 3 SASS instructions per decoded weight
    element on sm_90a, and no flush-to-zero arithmetic anywhere (a block's factor 2^(s - 127) is the
    fp32 subnormal 2^-127 for s = 0, which a .FTZ multiply would make 0)."""
    _, rows = gate
    fused = [r for r in rows if r["kernel"].startswith("_decode_") and "error" not in r]
    assert {r["kernel"] for r in fused} >= {
        "_decode_qkv_kernel",
        "_decode_linear_kernel",
        "_decode_router_kernel",
        "_decode_gate_up_kernel",
        "_decode_down_kernel",
    }
    for r in fused:
        assert r["spill_bytes"] == 0, (r["kernel"], r["target"], r["config"])
        if r["per_element"] is not None:
            assert r["loop_shared_ops"] == 0, (r["kernel"], r["target"], r["config"], r["loop_shared_ops"])
            assert r["ftz_ops"] == 0, (r["kernel"], r["target"], r["config"], r["ftz_ops"])
            if r["target"] == "sm_90a":
                assert r["per_element"] <= 3, (r["kernel"], r["config"], r["per_element"])


def test_fused_decode_tiles_meet_the_static_goals_at_one_token(gate):
    """gpt-oss-20b, one token, bf16, sm_90a: each fused MXFP4 decode launch keeps at least 16 warps
    resident per SM (so the weights stream from many SMs at once), runs at most 3,000 SASS instructions
    per warp in its K loop (trips x instructions per trip: a short serial chain), decodes and multiplies
    a weight element in at most 3 SASS instructions, and loads the next trip's weight words and vector
    parts a trip ahead: none of its loads is waited on in the trip that issues it."""
    _meet_the_static_goals(gate[1])


def _meet_the_static_goals(rows):
    interpret = os.environ.get("TRITON_INTERPRET")
    try:
        from compile_gate import decode_launch_table  # its import clears TRITON_INTERPRET for its own compiling
    finally:
        if interpret is not None:  # the rest of the suite runs its kernels under the interpreter
            os.environ["TRITON_INTERPRET"] = interpret

    table = {r["kernel"]: r for r in decode_launch_table(rows) if r["kernel"].startswith("_decode_")}
    assert set(table) == {"_decode_gate_up_kernel", "_decode_down_kernel"}, set(table)
    for name, r in table.items():
        assert r["resident_warps"] >= 16, (name, r)
        assert r["serial"] <= 3000, (name, r)
        assert r["per_element"] <= 3, (name, r)
        assert r["loop_loads_waited"] == 0, (name, r)


# A launch's tiles compiled ahead by gptoss.kernels.moe.compile_tiles, on a driver that only reports an
# sm_90 target (nothing is launched): then the autotuner's own pass over the same launch, its timing
# stubbed and its runs compiled but not launched, must find every tile compiled already.
COMPILE_AHEAD = """
import json, sys, threading
sys.path.insert(0, sys.argv[1])
import triton, triton.compiler
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver


class Sm90:
    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


threads = []
compile = triton.compiler.compile


def counting(*args, **kwargs):
    threads.append(threading.get_ident())
    return compile(*args, **kwargs)


triton.compiler.compile = counting  # the JIT takes it from there when it makes its binder

import compile_gate
from gptoss.kernels import moe

launch = next(
    l for l in compile_gate.run_workloads()
    if compile_gate._jit_of(l.kernel).__name__ == "_moe_gate_up_kernel" and l.label["shape"] == "gpt-oss-20b"
    and l.label["dtype"] == "bfloat16" and not l.kwargs["ADD"] and dict(zip(l.kernel.arg_names, l.args))["ROWS"] == 64
)
tuner = launch.kernel
driver.set_active(Sm90())
key = moe._tuning_key(tuner, launch.args, launch.kwargs)
known = key in tuner.cache
tiles = moe.compile_tiles(tuner, launch.grid, launch.args, launch.kwargs, workers=int(sys.argv[2]))
ahead = list(threads)
run = tuner.fn.run
tuner.fn.run = lambda *args, **kwargs: run(*args, **{**kwargs, "warmup": True})
tuner._do_bench = lambda call, quantiles: (call(), [1.0, 1.0, 1.0])[1]
tuner[launch.grid](*launch.args, **launch.kwargs)
print(json.dumps(dict(
    version=triton.__version__, tiles=tiles, ahead=len(ahead), threads=len(set(ahead)),
    after=len(threads) - len(ahead), known=known, filed=key in tuner.cache,
)))
"""


@pytest.mark.parametrize("triton_version", ["newest", GPU_TRITON])
def test_the_tiles_an_autotuner_will_time_are_compiled_ahead_side_by_side(tmp_path, monkeypatch, triton_version):
    # on a GPU the autotuner compiles each tile as it times it, one after another (2-3 s each here), and
    # the recipe's first step meets 53 tiles for 20b. compile_tiles compiles them on threads first, into
    # the JIT's cache under the keys the autotuner's runs look up: its pass then compiles nothing
    side = None if triton_version == "newest" else side_triton(triton_version)
    script = tmp_path / "ahead.py"
    script.write_text(COMPILE_AHEAD)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))  # compiled here, not found on disk
    done = compiling(str(script), str(GATE.parent), "2", path=side)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    if side is not None:
        assert found["version"] == GPU_TRITON
    # the 64-row bucket's gate_up tiles, two at a time; the key the autotuner files its choice under is the
    # one _launch asks about
    from gptoss.kernels import moe

    tiles = len(moe.CONFIGS["gate_up"][64])
    assert found["tiles"] == found["ahead"] == tiles and found["threads"] == 2, found
    assert found["after"] == 0, found
    assert not found["known"] and found["filed"], found
