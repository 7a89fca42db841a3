"""`ecot-serve` driven by the real openpi client: openpi-client 0.1.2 from the package registry, in a virtual
environment of its own (it needs numpy < 2), talking to a server started on a saved tiny policy."""
import json
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

FRAME = np.random.default_rng(0).integers(0, 255, (80, 100, 3), dtype=np.uint8)
STATE = np.linspace(-0.5, 0.5, 7).astype(np.float32)
PROMPT = "put the red block in the bowl"


@pytest.fixture(scope="module")
def openpi_python(tmp_path_factory):
    "The python of a virtual environment with openpi-client installed (numpy < 2 there, whatever numpy is here)."
    d = tmp_path_factory.mktemp("openpi-venv")
    subprocess.run([sys.executable, "-m", "venv", str(d)], check=True)
    py = d / "bin" / "python"
    # openpi-client 0.1.2 imports typing_extensions without declaring it
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", "openpi-client==0.1.2",
                        "typing_extensions"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return py


@pytest.fixture(scope="module")
def saved_policy(tmp_path_factory):
    import torch
    from ecot.inference import ActingSpec
    from ecot.policy import ECoTPolicy
    from ecot.eos import EOSConfig
    from ecot.action_head import ActionHeadConfig
    from ecot.processor import load_processor
    torch.manual_seed(0)
    stats = {"bridge": {"action": {"q01": [-0.2] * 7, "q99": [0.2] * 7}, "state": {"q01": [-1.0] * 7, "q99": [1.0] * 7}}}
    pol = ECoTPolicy.build("tiny", load_processor("tiny"), 
                           action_head=ActionHeadConfig(action_dim=7, chunk_len=4, state_dim=7, hidden_size=32, num_layers=1), dataset_statistics=stats, eos=EOSConfig(hidden_dim=16),
                           acting=ActingSpec(stage=2, image_size=(64, 64), max_new_tokens=6))
    d = tmp_path_factory.mktemp("policy")
    np.save(d / "frame.npy", FRAME)
    return pol.save_pretrained(d / "policy")


def _start(policy_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(["ecot-serve", "--policy", str(policy_dir), "--host", "127.0.0.1", "--port", str(port),
                             "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 180
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return port, proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise AssertionError("ecot-serve did not listen within 180 s")


@pytest.fixture(scope="module")
def server(saved_policy):
    port, proc = _start(saved_policy)
    yield port
    proc.kill()


def _client(python, port, body: str, tmp_path) -> dict:
    "Run `body` with an openpi client `make()` in the openpi environment; returns the JSON it prints last."
    script = textwrap.dedent('''
        import json, threading, numpy as np
        from openpi_client.websocket_client_policy import WebsocketClientPolicy
        make = lambda: WebsocketClientPolicy("127.0.0.1", PORT)
        frame = np.load("FRAME")
        obs = {"observation/image": frame, "observation/state": np.float32(STATE), "prompt": "PROMPT"}
    ''').replace("PORT", str(port)).replace("FRAME", str(tmp_path / "frame.npy")) \
        .replace("STATE", str(STATE.tolist())).replace("PROMPT", PROMPT) + textwrap.dedent(body)
    np.save(tmp_path / "frame.npy", FRAME)
    r = subprocess.run([str(python), "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_openpi_client_gets_the_in_process_actions(openpi_python, server, saved_policy, tmp_path):
    from ecot.policy import ECoTPolicy
    got = _client(openpi_python, server, '''
        c = make()
        out = c.infer(obs)
        print(json.dumps(dict(meta=c.get_server_metadata(), actions=out["actions"].tolist(), eos=out["eos_probs"].tolist(),
                              reasoning=out["reasoning"], text=out["reasoning_text"], timing=out["server_timing"],
                              dtype=str(out["actions"].dtype))))
    ''', tmp_path)
    meta = got["meta"]
    assert (meta["action_dim"], meta["chunk_len"], meta["stage"], meta["state_dim"]) == (7, 4, 2, 7)
    assert meta["observation_keys"]["image"] == "observation/image" and meta["image_size"] == [64, 64]
    ref = ECoTPolicy.from_pretrained(saved_policy).predict_action(FRAME, PROMPT, STATE)
    np.testing.assert_allclose(np.array(got["actions"]), ref["actions"][0], atol=1e-5)
    np.testing.assert_allclose(np.array(got["eos"]), ref["eos_probs"][0], atol=1e-5)
    assert got["text"] == ref["reasoning_text"][0] and got["reasoning"] == ref["reasoning"][0]
    assert got["timing"]["infer_ms"] > 0 and got["timing"]["total_ms"] >= got["timing"]["infer_ms"]


def test_two_clients_at_once(openpi_python, server, tmp_path):
    got = _client(openpi_python, server, '''
        results, errors = {}, []
        def run(i):
            try:
                c = make()
                results[i] = [c.infer({**obs, "seed": i}).get("actions").tolist() for _ in range(3)]
            except Exception as e:
                errors.append(repr(e))
        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        [t.start() for t in threads]
        [t.join(240) for t in threads]
        print(json.dumps(dict(results=results, errors=errors)))
    ''', tmp_path)
    assert got["errors"] == [] and sorted(got["results"]) == ["0", "1"]
    for i, runs in got["results"].items():
        assert runs[0] == runs[1] == runs[2]  # each client's answers are its own, whatever the other sends
    assert got["results"]["0"] != got["results"]["1"]  # different seeds, different noise


def test_malformed_observations_get_an_error_naming_the_key(openpi_python, server, tmp_path):
    got = _client(openpi_python, server, '''
        c = make()
        bad = [{k: v for k, v in obs.items() if k != "observation/state"},
               {**obs, "observation/image": frame.astype(np.float32)},
               {**obs, "observation/image": frame[..., :2]},
               {**obs, "observation/state": np.float32([np.nan] * 7)},
               {**obs, "prompt": 7}]
        errors = []
        for o in bad:
            try:
                c.infer(o)
                errors.append(None)
            except RuntimeError as e:
                errors.append(str(e))
        ok = c.infer(obs)["actions"].shape  # the same connection still serves
        print(json.dumps(dict(errors=errors, ok=list(ok))))
    ''', tmp_path)
    expected = ["observation/state", "observation/image: expected a uint8", "observation/image: expected a uint8",
                "observation/state: expected finite", "prompt: expected a str"]
    for err, want in zip(got["errors"], expected):
        assert err is not None and want in err, (want, err)
    assert got["ok"] == [4, 7]


def test_sigterm_shuts_the_server_down_cleanly(openpi_python, saved_policy, tmp_path):
    port, proc = _start(saved_policy)
    try:
        _client(openpi_python, port, '''
            c = make()
            print(json.dumps(dict(shape=list(c.infer(obs)["actions"].shape))))
        ''', tmp_path)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        out = proc.stdout.read()
        assert "shut down" in out, out[-2000:]
    finally:
        proc.kill()
