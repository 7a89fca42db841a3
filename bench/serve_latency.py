"""Serving overhead: the round trip of one observation through `ecot-serve`'s server (openpi protocol, loopback,
batch 1, a 224 x 224 frame) against the same `predict_action` in process, measured in one run.

    python bench/serve_latency.py                          # the tiny policy on this machine's CPU
    python bench/serve_latency.py --policy runs/x/policy   # a saved policy (on CUDA when there is one)

overhead = round trip - in-process call (medians); per call, round trip - the server's own `infer_ms` is printed
too (packing, websocket frames, unpacking, checking the observation).
"""
import argparse
import statistics
import threading
import time

import numpy as np
import torch
from websockets.sync.client import connect

from ecot.action_head import ActionHeadConfig
from ecot.inference import ActingSpec
from ecot.policy import ECoTPolicy
from ecot.processor import load_processor
from ecot.serve import PolicyServer, packb, unpackb


def tiny_policy(stage: int) -> ECoTPolicy:
    stats = {"bridge": {"action": {"q01": [-1.0] * 7, "q99": [1.0] * 7}, "state": {"q01": [-1.0] * 7, "q99": [1.0] * 7}}}
    return ECoTPolicy.build("tiny", load_processor("tiny"), action_head=ActionHeadConfig(chunk_len=8, state_dim=7),
                            dataset_statistics=stats, acting=ActingSpec(stage=stage, image_size=(224, 224)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", default=None, help="a saved policy directory (default: the tiny policy, all latent)")
    ap.add_argument("--stage", type=int, default=8, help="stage of the tiny policy (8: no text decoding)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    torch.set_num_threads(1)
    policy = (ECoTPolicy.from_pretrained(a.policy, device=a.device) if a.policy else tiny_policy(a.stage)).eval()
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)
    state = np.zeros(policy.action_head.state_dim, np.float32)
    obs = {"observation/image": frame, "prompt": "put the spoon on the towel"}
    if len(state):
        obs["observation/state"] = state

    def in_process():
        policy.predict_action(frame, obs["prompt"], state if len(state) else None)

    server = PolicyServer(policy, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    while server._server is None:
        time.sleep(0.05)
    port = server._server.socket.getsockname()[1]
    local, trips, outside = [], [], []
    with connect(f"ws://127.0.0.1:{port}", compression=None, max_size=None) as ws:
        unpackb(ws.recv())  # metadata
        for i in range(5 + a.steps):  # warm-up, then interleaved: both see the same machine state
            t0 = time.perf_counter()
            in_process()
            t1 = time.perf_counter()
            ws.send(packb(obs))
            reply = unpackb(ws.recv())
            t2 = time.perf_counter()
            if i >= 5:
                local.append(t1 - t0)
                trips.append(t2 - t1)
                outside.append((t2 - t1) * 1e3 - reply["server_timing"]["infer_ms"])
    server.shutdown()
    thread.join(10)
    med = lambda x: statistics.median(x) * 1e3
    print(f"policy {a.policy or f'tiny (stage {a.stage})'} on {a.device}, 224 x 224 frame, {a.steps} calls each, "
          f"torch {torch.__version__}")
    print(f"in process : median {med(local):7.2f} ms  mean {statistics.mean(local) * 1e3:7.2f} ms")
    print(f"round trip : median {med(trips):7.2f} ms  mean {statistics.mean(trips) * 1e3:7.2f} ms")
    print(f"overhead   : {med(trips) - med(local):.2f} ms (medians); outside the server's inference: median "
          f"{statistics.median(outside):.2f} ms, mean {statistics.mean(outside):.2f} ms (target <= 5 ms)")


if __name__ == "__main__":
    main()
