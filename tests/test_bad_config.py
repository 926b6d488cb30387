"""Bad config values: one clear line each, non-zero exit, no traceback. The tables list every case tried:
run config values, split command lines, emulated devices, runs under mpirun. Add a row to extend them
(test_run_cli.py's BAD_INPUT has the cases about shards, ratios and prompts)."""

from __future__ import annotations

import copy
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ROOT, run_tpi

from tpi_mpi import split
from tpi_mpi.config import ModelConfig, build_config
from tpi_mpi.errors import UserError

BASE: dict[str, Any] = {"model": {"path": "models/tiny"}, "prompt_ids": [1, 2, 3]}

# (key as typed on the command line, value after Hydra, what the one line must say)
BAD_VALUES: list[tuple[str, Any, str]] = [
    ("comm.algo", "foo", "unknown comm.algo='foo'"),
    ("comm.dtype", "int4", "unknown comm.dtype='int4': choose one of fp32, fp16, bf16, int8, auto"),
    ("comm.dtype", "auto", "comm.dtype=auto lets comm.algo=auto choose the wire, got comm.algo=star"),
    ("comm.timeout_s", -1, "comm.timeout_s must be >= 0 seconds"),
    ("comm.timeout_s", "abc", "comm.timeout_s must be a number or null, got 'abc'"),
    ("model.dtype", "fp8", "unknown model.dtype='fp8'"),
    ("model.verify_checksums", "md5", "unknown model.verify_checksums='md5'"),
    ("model.ratios", "abc", "model.ratios must be a list of numbers or null, got 'abc'"),
    ("model.ratios", ["a", 0.5], "model.ratios must be a list of numbers or null"),
    ("memory.kv_cache_tokens", 0, "memory.kv_cache_tokens must be positive or null"),
    ("memory.resident", "maybe", "memory.resident must be true, false or auto, got 'maybe'"),
    ("memory.window", -1, "memory.window must be a positive integer or null, got -1"),
    ("memory.window", 0, "memory.window must be a positive integer or null, got 0"),
    ("memory.window", "two", "memory.window must be an integer or null, got 'two'"),
    ("memory.budget", "lots", "memory.budget='lots' is not a size"),
    ("generation.max_new_tokens", -1, "generation.max_new_tokens must be >= 0"),
    ("generation.max_new_tokens", 1.5, "generation.max_new_tokens must be an integer, got 1.5"),
    ("generation.do_sample", "yes", "generation.do_sample must be true or false, got 'yes'"),
    ("generation.top_k", -3, "generation.top_k must be >= 0"),
    ("generation.top_p", 1.5, "generation.top_p must be in (0, 1]"),
    ("threads", 0, "threads must be >= 1 or null"),
    ("threads", "many", "threads must be an integer or null, got 'many'"),
    ("prompt_ids", [], "prompt_ids is empty"),
    ("prompt_ids", ["x"], "prompt_ids must be a list of integers or null"),
    ("logging.wandb_mode", "cloud", "logging.wandb_mode must be offline, online or disabled"),
    ("baseline", "foo", "unknown baseline='foo'"),
    ("model.colour", "red", "unknown key model.colour"),
    ("model.quant", "int3", "unknown quantization 'int3': choose one of none, int8, int4"),
    ("model.group_size", 64, "a group size applies to int4 only"),
    ("model.kernel", "fast", "unknown model.kernel='fast': choose one of auto, native, torch"),
    ("serve.port", 70000, "serve.port must be in 0..65535"),
    ("serve.port", "http", "serve.port must be an integer, got 'http'"),
    ("serve.queue_size", -1, "serve.queue_size must be >= 0"),
    ("serve.max_tokens", 0, "serve.max_tokens must be >= 1"),
    ("serve.max_body_bytes", 0, "serve.max_body_bytes must be >= 1"),
    ("serve.api_key", " ", "serve.api_key is empty"),
    ("serve.heartbeat_s", -1, "serve.heartbeat_s must be >= 0 seconds"),
    ("serve.health_timeout_s", 0, "serve.health_timeout_s must be > 0"),
    ("serve.chat_stop", [""], "serve.chat_stop has an empty string"),
    ("serve.chat_stop", "x", "serve.chat_stop must be a list of strings"),
    ("serve.colour", "red", "unknown key serve.colour"),
    ("colour", "red", "unknown config key 'colour'"),
]


def with_value(key: str, value: Any) -> dict[str, Any]:
    d = copy.deepcopy(BASE)
    *sections, last = key.split(".")
    node = d
    for s in sections:
        node = node.setdefault(s, {})
    node[last] = value
    return d


@pytest.mark.parametrize("key,value,message", BAD_VALUES, ids=[f"{k}={v!r}" for k, v, _ in BAD_VALUES])
def test_bad_value_is_one_clear_line(key: str, value: Any, message: str) -> None:
    with pytest.raises(UserError) as exc:
        build_config(with_value(key, value))
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)


def test_sampling_needs_a_positive_temperature() -> None:
    d = with_value("generation.temperature", 0.0)
    d["generation"]["do_sample"] = True
    with pytest.raises(UserError, match="generation.temperature must be > 0 when sampling"):
        build_config(d)


# The split's command line: (arguments after --model M --out O, what the one line must say)
BAD_SPLITS: list[tuple[list[str], str]] = [
    (["--world-size", "0"], "world size must be at least 1, got 0"),
    (["--world-size", "-2"], "world size must be at least 1, got -2"),
    (["--world-size", "2", "--ratios", "1.5,-0.5"], "ratios must all be positive"),
    (["--world-size", "3", "--ratios", "0.5,0.5"], "2 ratios given for a world size of 3"),
    (["--world-size", "2", "--ratios", "half,half"], "--ratios takes comma-separated numbers"),
    (["--world-size", "1", "--quant", "int3"], "unknown quantization 'int3': choose one of none, int8, int4"),
    (["--world-size", "1", "--quant", "int4", "--group-size", "48"], "int4 group size 48 is not supported"),
    # 8 heads of 32: a slice of whole groups of 128 columns is 4 heads, so 2 ranks at most
    (["--world-size", "3", "--quant", "int4", "--group-size", "128"],
     "group size 128 does not divide the attention slices of 3 ranks"),
]


@pytest.mark.parametrize("args,message", BAD_SPLITS, ids=[" ".join(a) for a, _ in BAD_SPLITS])
def test_bad_split_is_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                                     message: str) -> None:
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama", "num_attention_heads": 8, "hidden_size": 256, '
                                       '"intermediate_size": 688, "num_hidden_layers": 1}')
    (model / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    assert split.main(["--model", str(model), "--out", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tpi_mpi: error: ") and message in err[0], err
    assert not (tmp_path / "out").exists()


# Emulated devices (`python -m tpi_mpi.emulate up|run|check ...`): (arguments, what the one line must say).
# Profiles are checked before anything is set up, so these need neither root nor a session.
BAD_DEVICES: list[tuple[list[str], str]] = [
    (["devices=0"], "devices=0: at least 1"),
    (["devices=-3"], "devices=-3: at least 1"),
    (["devices=many"], "devices=many: a number"),
    (["device.cpus=4096"], "cpus=4096 is more than this machine's"),
    (["device.memory=64TiB"], "is more than this machine's"),
    (["device.memory=1MiB"], "is below 16 MiB"),
    (["device.cpus=-1"], "device.cpus must be > 0"),
    (["device=phone,laptop", "devices=3"], "names 2 profiles for devices=3"),
    (["network.bandwidth_mbit=0"], "network.bandwidth_mbit must be > 0"),
    (["colour=red"], "unknown key 'colour'"),
]


@pytest.mark.parametrize("args,message", BAD_DEVICES, ids=[" ".join(a) for a, _ in BAD_DEVICES])
def test_bad_device_is_one_clear_line(capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    from tpi_mpi.emulate.__main__ import main

    assert main(["up", "session=relbad", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tpi_mpi: error: ") and message in err[0], err


# Under mpirun: (ranks, overrides, what the one line must say). Every rank must exit, none with a traceback.
BAD_RUNS: list[tuple[int, list[str], str]] = [
    (3, ["comm.algo=foo"], "unknown comm.algo='foo'"),
    (2, ["comm=ring", "comm.dtype=auto"], "comm.dtype=auto lets comm.algo=auto choose the wire"),
    (2, ["comm.timeout_s=abc"], "comm.timeout_s must be a number or null"),
    (2, ["model.verify_checksums=md5"], "unknown model.verify_checksums='md5'"),
    (2, ["threads=0"], "threads must be >= 1 or null"),
    (2, ["memory.resident=false", "memory.window=-1"], "memory.window must be a positive integer or null"),
    # Hydra's own error (a key not in the config): one line too, not Hydra's message and exit(1)
    (2, ["model.colour=red"], "Could not override 'model.colour'. To append to your config use +model.colour=red"),
]


@pytest.mark.parametrize("n,overrides,message", BAD_RUNS, ids=[" ".join(o) for _, o, _ in BAD_RUNS])
def test_bad_value_under_mpirun_stops_every_rank(tmp_path: Path, n: int, overrides: list[str], message: str) -> None:
    proc = run_tpi(n, ["prompt_ids=[1,2,3]", "output.results=null", *overrides], tmp_path, timeout=120)
    assert proc.returncode != 0  # mpirun returns once every rank has exited
    errors = [line for line in proc.stderr.splitlines() if line.startswith("tpi_mpi: error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout


@pytest.mark.parametrize("path", sorted((ROOT / "conf" / "model").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_model_file_has_every_model_key(path: Path) -> None:
    """A key missing from conf/model/X.yaml cannot be overridden on the command line with model=X (Hydra: "Key
    'quant' is not in struct"): model=shakespeare model.quant=int4 failed so."""
    assert set(yaml.safe_load(path.read_text())) == {f.name for f in fields(ModelConfig)}
