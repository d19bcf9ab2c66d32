"""Small test models, each shaped to exercise one hard case of capture and split.

- `UNet`: skip connections, so several tensors cross most cuts.
- `TwoInputDict`: two inputs, a dict output, and an input that is only used late (passes through).
- `TransformerModel`: a torch.nn.TransformerEncoder, whose eval/no-grad eager path is a fused kernel.
- `DataDependent`: Python branching on a tensor value, which torch.export cannot capture.
- `FixedBatch`: a hard-coded batch size, so the capture falls back to a static batch.
- `mlp()`: a 13-layer MLP (64 wide) that splits into 7 segments: the runtime's failover and drift tests.
All are tiny so tests stay fast; `example_*` give inputs of the right shapes.
"""

from __future__ import annotations

import torch
from torch import nn


class DoubleConv(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, padding=1),
            nn.BatchNorm2d(c_out),
            nn.ReLU(),
            nn.Conv2d(c_out, c_out, 3, padding=1),
            nn.BatchNorm2d(c_out),
            nn.ReLU(),
        )

    def forward(self, x):
        return self.body(x)


class Down(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.pool = nn.MaxPool2d(2)
        self.conv = DoubleConv(c_in, c_out)

    def forward(self, x):
        return self.conv(self.pool(x))


class Up(nn.Module):
    def __init__(self, c_in: int, c_skip: int, c_out: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(c_in, c_in // 2, 2, stride=2)
        self.conv = DoubleConv(c_in // 2 + c_skip, c_out)

    def forward(self, x, skip):
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class UNet(nn.Module):
    """A three-level U-Net: the encoder's outputs cross every cut up to the decoder that reads them."""

    def __init__(self, channels: int = 8, classes: int = 3):
        super().__init__()
        c = channels
        self.inc = DoubleConv(3, c)
        self.down1 = Down(c, 2 * c)
        self.down2 = Down(2 * c, 4 * c)
        self.up1 = Up(4 * c, 2 * c, 2 * c)
        self.up2 = Up(2 * c, c, c)
        self.outc = nn.Conv2d(c, classes, 1)

    def forward(self, x):
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        y = self.up1(x3, x2)
        y = self.up2(y, x1)
        return self.outc(y)


class Mixer(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, width)

    def forward(self, x):
        return x + torch.relu(self.fc(self.norm(x)))


class TwoInputDict(nn.Module):
    """forward(image, features) -> {"logits", "embedding"}; `features` is only read by the last block."""

    def __init__(self, width: int = 32, classes: int = 5, features: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.proj = nn.Linear(8 * 8 * 8, width)
        self.blocks = nn.Sequential(*[Mixer(width) for _ in range(4)])
        self.side = nn.Linear(features, width)
        self.head = nn.Linear(width, classes)

    def forward(self, image, features):
        x = torch.relu(self.conv(image)).flatten(1)
        x = self.blocks(self.proj(x))
        embedding = x + self.side(features)
        return {"logits": self.head(embedding), "embedding": embedding}


class TransformerModel(nn.Module):
    """An nn.TransformerEncoder (batch-first, 4 layers) and a linear head, on float token features."""

    def __init__(self, d_model: int = 32, heads: int = 4, layers: int = 4, classes: int = 5):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_model, heads, dim_feedforward=2 * d_model, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, classes)

    def forward(self, tokens):
        return self.head(self.encoder(tokens))


class Gate(nn.Module):
    def forward(self, x):
        if x.mean() > 0:  # data-dependent Python control flow: torch.export cannot trace this
            return x * 2
        return x - 1


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.gate = Gate()

    def forward(self, x):
        return self.gate(self.fc(x))


def make(name: str) -> tuple[nn.Module, tuple]:
    """A model in eval mode with fixed random weights, and example inputs (batch 2)."""
    torch.manual_seed(0)
    if name == "unet":
        model, inputs = UNet(), (torch.randn(2, 3, 32, 32),)
    elif name == "two_input_dict":
        model, inputs = TwoInputDict(), (torch.randn(2, 3, 16, 16), torch.randn(2, 10))
    elif name == "transformer":
        model, inputs = TransformerModel(), (torch.randn(2, 12, 32),)
    elif name == "data_dependent":
        model, inputs = DataDependent(), (torch.randn(2, 4),)
    elif name == "fixed_batch":
        model, inputs = FixedBatch(), (torch.randn(2, 3, 6),)
    else:
        raise KeyError(name)
    return model.eval(), inputs


def factory_unet() -> nn.Module:
    """For `load_ref("tests/zoo.py:factory_unet")`."""
    return UNet()


class FixedBatch(nn.Module):
    """Reshapes with a hard-coded batch size, so torch.export must capture it statically."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 6)
        self.fc2 = nn.Linear(6, 6)

    def forward(self, x):
        return self.fc2(self.fc1(x).reshape(2, 3, 6))


def factory_two_input() -> nn.Module:
    """For `partita inspect tests/zoo.py:factory_two_input --input-shape '2,3,16,16;2,10'`."""
    return TwoInputDict()


_CAPTURED: dict[str, tuple] = {}


def captured(name: str) -> tuple:
    """(model, example inputs at batch 2, ModelGraph), captured once per test session.

    Names are those of `make` plus torchvision classifiers (random weights, 224x224 inputs).
    """
    if name not in _CAPTURED:
        from partita.model import capture

        if name in ("unet", "two_input_dict", "transformer"):
            model, inputs = make(name)
        else:
            import torchvision

            torch.manual_seed(0)
            model = torchvision.models.get_model(name, weights=None).eval()
            inputs = (torch.randn(2, 3, 224, 224),)
        _CAPTURED[name] = (model, inputs, capture(model, inputs, name=name))
    return _CAPTURED[name]


def mlp() -> nn.Module:
    """Seven Linear layers with ReLUs between them, seeded: cheap to run, several stages to place."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(6):
        layers += [nn.Linear(64, 64), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(64, 5)).eval()


def local_cluster(devices, *, speed: float = 0.5, latency: str = "0.2ms"):
    """A LocalCluster of equal emulated devices on 1 GB/s links: the process-level tests' usual cluster.

    Use as a context manager (`with local_cluster(("a", "b")) as cluster:`); it stops its workers on exit.
    """
    import partita
    from partita.cluster import ClusterSpec

    spec = ClusterSpec.from_dict({
        "source": "client",
        "devices": [{"name": n, "flops_per_s": 1e9, "memory_bytes": 2**30, "speed": speed} for n in devices],
        "links": {"default": {"bandwidth": "1GB/s", "latency": latency}},
    })
    return partita.LocalCluster(spec)
