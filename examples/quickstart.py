"""The Python API in one page: deploy torchvision's resnet18 on an emulated two-device cluster.

Run: .venv/bin/python examples/quickstart.py
"""

import torch
import torchvision

import partita


def main() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    example = torch.randn(1, 3, 64, 64)
    with partita.LocalCluster.from_yaml("examples/clusters/tiny-2.yaml") as cluster:
        pipe = partita.deploy(model, (example,), cluster, objective="throughput", planner="optimal")
        print(pipe.plan)
        batches = [torch.randn(1, 3, 64, 64) for _ in range(32)]
        # Workers run stages on one torch thread; CPU kernels reduce in a different order on more
        # threads, so the reference runs on one thread too (bit-identity is per kernel configuration).
        torch.set_num_threads(1)
        with torch.no_grad():
            expected = [model(x) for x in batches]
        outputs = list(pipe.map(batches))  # many requests in flight, results in order
        exact = all(torch.equal(y, e) for y, e in zip(outputs, expected, strict=True))
        stats = pipe.stats()
        print(f"32 requests, every output bit-identical to the unsplit model: {exact}")
        predicted, measured = stats["predicted"]["period_s"], stats["measured"]["period_s"]
        print(f"period predicted {predicted * 1e3:.2f} ms, measured {measured * 1e3:.2f} ms (device time)")


if __name__ == "__main__":
    main()
