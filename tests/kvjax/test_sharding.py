"""Multi-device generation (`kvjax.sharding`): sharded results equal single-device results.

The device tests run `tests/kvjax/mesh_parity.py` once, in a subprocess with 8 forced CPU
devices (this process has initialised jax with one), on meshes `data=2,model=2` (4 devices,
every dimension splits, offloading methods) and `data=2,model=4` (8 devices, KV heads and
vocabulary replicated); `tests/kvjax/mesh_vision.py` likewise runs the LLaVA-OneVision
vision path (parameter layout, `encode_frames`, a stream of pixel frames) on both meshes,
and `tests/kvjax/multiprocess.py` runs text generation and the vision path across two jax
processes. Mesh specs and their errors are checked here directly.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kvjax.cli import main
from kvjax.sharding import make_mesh, parse_mesh

MESHES = ("data=2,model=2", "data=2,model=4")
REPO = Path(__file__).resolve().parents[2]


def run_script(module: str) -> dict:
    """The JSON that `python -m module` prints (a process with 8 CPU devices)."""
    done = subprocess.run([sys.executable, "-m", module], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def parity() -> dict:
    """The JSON results of `mesh_parity.py` (one jax start-up for every mesh and method)."""
    return run_script("tests.kvjax.mesh_parity")


@pytest.fixture(scope="module")
def vision() -> dict:
    """The JSON results of `mesh_vision.py`: the LLaVA-OneVision vision path on each mesh."""
    return run_script("tests.kvjax.mesh_vision")


@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_generation_equals_single_device(parity, mesh):
    single, sharded = parity["single"]["generate"], parity[mesh]["generate"]
    assert set(sharded["tokens"]) == {"full", "clusterkv", "freekv"}
    for method, tokens in single["tokens"].items():
        assert sharded["tokens"][method] == tokens, method
        assert len(tokens) == 4 and all(len(row) == 12 for row in tokens)  # batch 4, no early stop
        for key, value in single["stats"][method].items():  # e.g. FreeKV's correction rate
            assert sharded["stats"][method][key] == pytest.approx(value), (method, key)
    assert single["tokens"]["clusterkv"] != single["tokens"]["full"] != single["tokens"]["freekv"]  # they select
    np.testing.assert_allclose(sharded["logits"], single["logits"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_streams_equal_single_device(parity, mesh):
    """Four LiveVLM text streams, one question each: same answers, same first-token logits."""
    single, sharded = parity["single"]["stream"], parity[mesh]["stream"]
    assert sharded["tokens"] == single["tokens"] and len(set(map(tuple, single["tokens"]))) == 4
    np.testing.assert_allclose(sharded["logits"], single["logits"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("mesh", MESHES)
def test_one_compile_per_shape_and_donation_under_a_mesh(parity, mesh):
    for part in ("generate", "stream"):
        assert parity[mesh][part]["compiles"] == parity["single"][part]["compiles"], part
    assert not [w for w in parity["warnings"] if "donat" in w.lower()]


def test_params_and_caches_are_laid_out_on_the_mesh(parity):
    split = parity["data=2,model=2"]
    assert split["params"][".layers[0].wq"] == [[None, "model"], "device"]
    assert split["params"][".layers[0].w_down"] == [["model"], "device"]
    assert split["params"][".embed"] == [["model"], "device"]
    layout = split["generate"]["layout"]
    assert layout["full"][".layers[0].k"] == [["data", "model"], "device"]
    assert layout["full"][".lengths"] == [["data"], "device"]
    # Host-memory shards stay in host memory, split like the device cache.
    assert layout["clusterkv"][".layers[0].recall.host_k"] == [["data", "model"], "pinned_host"]
    assert layout["freekv"][".layers[0].pool"] == [["data", None, "model"], "pinned_host"]
    assert split["stream"]["layout"][".layers[0].long_k"] == [["model"], "device"]
    # model=4: the 8 query heads split, the 2 KV heads and the 258-token vocabulary replicate.
    wide = parity["data=2,model=4"]
    assert wide["params"][".layers[0].wq"] == [[None, "model"], "device"]
    assert wide["params"][".layers[0].wk"] == [[], "device"]
    assert wide["params"][".embed"] == [[], "device"]
    assert wide["generate"]["layout"]["full"][".layers[0].k"] == [["data"], "device"]
    assert wide["stream"]["layout"][".layers[0].long_k"] == [[], "device"]


def test_host_offload_copies_per_device(parity):
    """The compiled decode loops of the offloading methods on `data=2,model=2` move no host
    array (ClusterKV's clustered tokens, FreeKV's page pool) between devices: each device
    copies from its own shard (they once all-gathered the whole host store every step)."""
    found = parity["data=2,model=2"]["generate"]["host_collectives"]
    assert found == {"clusterkv": [], "freekv": []}
    # ReKV's retrieval of host frames, heads split over `model`: per KV head as well.
    assert parity["data=2,model=2"]["rekv_retrieval_collectives"] == []


def test_vision_params_are_laid_out_on_the_mesh(vision):
    """SigLIP's attention by head and MLP by unit, the projector by hidden unit, on `model`
    where they divide; `llava_params.text` is the placed decoder `params` itself."""
    split, wide = vision["data=2,model=2"]["params"], vision["data=2,model=4"]["params"]
    for name, spec in {"wq": [None, "model"], "bk": ["model"], "wo": ["model"], "bo": [],
                       "fc1_w": [None, "model"], "fc2_w": ["model"], "ln1_w": []}.items():
        assert split[f".vision.layers[1].{name}"] == [spec, "device"], name
    assert split[".proj1_w"] == [[None, "model"], "device"] and split[".proj2_w"] == [["model"], "device"]
    assert split[".vision.pos"] == split[".image_newline"] == [[], "device"]
    assert split[".text.layers[0].wk"] == [[None, "model"], "device"]  # the decoder's rules
    # model=4: SigLIP's 2 heads replicate, its 48 MLP units and the projector's 64 still split.
    assert wide[".vision.layers[0].wq"] == [[], "device"]
    assert wide[".vision.layers[0].fc1_w"] == [[None, "model"], "device"]
    assert wide[".proj1_w"] == [[None, "model"], "device"]
    assert vision["data=2,model=2"]["text_is_params"] and vision["data=2,model=4"]["text_is_params"]
    # The compiled tower runs on the weight shards: no collective moves a parameter.
    assert vision["data=2,model=2"]["weight_moves"] == vision["data=2,model=4"]["weight_moves"] == []


@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_encode_frames_equals_single_device(vision, mesh):
    """A batch of frames splits over `data` when it divides (4), else replicates (1); the
    features come back replicated and equal to one device's (float32 sums in another order,
    features up to ~40)."""
    single, sharded = vision["single"], vision[mesh]
    assert sharded["frames_layout"] == {"1": [], "4": ["data"]}
    assert sharded["encoded_layout"] == {"1": [], "3": []}
    for n in ("1", "3"):
        np.testing.assert_allclose(sharded["encoded"][n], single["encoded"][n], atol=5e-5, rtol=1e-5)


@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_vision_stream_equals_single_device(vision, mesh):
    """A LiveVLM stream of 6 pixel frames through the vision tower, then a question: the
    same answer and first-token logits on the mesh as on one device."""
    single, sharded = vision["single"], vision[mesh]
    assert sharded["tokens"] == single["tokens"] and len(single["tokens"]) == 8
    np.testing.assert_allclose(sharded["logits"], single["logits"], atol=1e-4, rtol=0)


def last_json_line(text: str) -> dict:
    """The JSON object a script printed last (gloo may print its own lines)."""
    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> tuple[dict, list[dict]]:
    """`multiprocess.py` in one process, and in two processes forming one 4-device mesh."""
    with socket.socket() as s:  # a free port for the coordinator
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    logs = tmp_path_factory.mktemp("multiprocess")
    # Output goes to files, not pipes: a process blocked on a full pipe would stall the other
    # one at jax's shutdown barrier.
    runs = []
    for rank in (-1, 0, 1):
        out, err = (open(logs / f"{rank}.{kind}", "w+") for kind in ("out", "err"))
        runs.append((subprocess.Popen([sys.executable, "-m", "tests.kvjax.multiprocess", str(rank), str(port)],
                                      cwd=REPO, stdout=out, stderr=err, text=True), out, err))
    results = []
    for proc, out, err in runs:
        proc.wait(timeout=900)
        out.seek(0), err.seek(0)
        assert proc.returncode == 0, err.read()[-3000:]
        results.append(last_json_line(out.read()))
        out.close(), err.close()
    return results[0], results[1:]


def test_two_processes_equal_one(two_processes):
    """Two jax processes (2 CPU devices each, `jax.distributed`) on the mesh data=2,model=2:
    every process gets the single process's tokens for Full and the offloading ClusterKV and
    FreeKV (batch 4), and for a LiveVLM stream of pixel frames through the sharded vision
    tower, whose features equal one device's."""
    single, ranks = two_processes
    assert (single["processes"], single["devices"]) == (1, 2)
    for r in ranks:
        assert (r["processes"], r["devices"]) == (2, 4)
        assert r["tokens"] == single["tokens"] and set(r["tokens"]) == {"full", "clusterkv", "freekv"}
        assert r["stream_tokens"] == single["stream_tokens"] and len(single["stream_tokens"]) == 8
        np.testing.assert_allclose(r["stream_logits"], single["stream_logits"], atol=1e-4, rtol=0)
        np.testing.assert_allclose(r["encoded"], single["encoded"], atol=5e-5, rtol=1e-5)


def test_batch_not_splitting_over_data_is_an_error(parity):
    assert "a batch of 3 sequences does not split over the mesh's data axis (data=2)" in parity["errors"]["batch"]


def test_parse_mesh():
    assert parse_mesh("data=2,model=4") == {"data": 2, "model": 4}
    assert parse_mesh(" model=2 ") == {"data": 1, "model": 2}


@pytest.mark.parametrize(
    "spec,message",
    [
        ("data2", "expected 'axis=size' items"),
        ("data=0", "expected 'axis=size' items"),
        ("data=two", "expected 'axis=size' items"),
        ("pipe=2", "unknown axis 'pipe'"),
        ("data=1,data=1", "axis 'data' is given twice"),
        ("data=2,model=2", "has 4 devices but there are 1"),
    ],
)
def test_bad_mesh_specs(spec, message, capsys):
    with pytest.raises(ValueError, match=message):
        make_mesh(spec)
    assert main(["generate", "--prompt", "hi", "--mesh", spec]) == 2
    assert re.match(f"kvjax generate: error: --mesh: .*{re.escape(message)}", capsys.readouterr().err)
