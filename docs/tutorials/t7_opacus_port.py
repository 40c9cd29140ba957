"""
Porting an Opacus training script
=================================

Opacus' MNIST example makes an ordinary PyTorch loop private with one call,
``privacy_engine.make_private(module=..., optimizer=..., data_loader=..., noise_multiplier=...,
max_grad_norm=...)``, and keeps the loop as it is. :func:`functorch_lite.dp.make_private` takes
the same arguments and returns the same three things, so the port changes the imports and that
one call. The loop below is Opacus' (forward, mean cross-entropy, ``loss.backward()``,
``optimizer.step()``), on scikit-learn's digits instead of MNIST (no download here), with a CNN
like the example's. What differs inside: the per-example gradients are never formed where a layer
has a rule (ghost clipping from the layers' inputs and output gradients, see
:doc:`/dp_clipping`), and the example dim of every layer is known exactly.

.. code-block:: python

    # Opacus                                        # functorch_lite
    from opacus import PrivacyEngine                # import functorch_lite as ft
    privacy_engine = PrivacyEngine()                #
    model, optimizer, train_loader = \\             # model, optimizer, train_loader = \\
        privacy_engine.make_private(                #     ft.dp.make_private(
            module=model, optimizer=optimizer,      #         model, optimizer,
            data_loader=train_loader,               #         train_loader,
            noise_multiplier=1.1,                   #         noise_multiplier=1.1,
            max_grad_norm=1.0)                      #         max_grad_norm=1.0)
    privacy_engine.get_epsilon(delta)               # optimizer.get_epsilon(delta)
"""

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits

import functorch_lite as ft

torch.manual_seed(0)
torch.set_num_threads(1)
logging.getLogger("absl").setLevel(logging.ERROR)  # dp-accounting's notes on skipped orders

digits = load_digits()
images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8)
labels = torch.tensor(digits.target)
perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
train, test = perm[:1400], perm[1400:]
train_loader = torch.utils.data.DataLoader(
    torch.utils.data.TensorDataset(images[train], labels[train]), batch_size=64
)


class SampleConvNet(nn.Module):
    """The shape of Opacus' MNIST example network, for 8x8 images; GroupNorm, not BatchNorm."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.norm = nn.GroupNorm(4, 16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 2 * 2, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.norm(self.conv1(x))), 2)  # 16 x 4 x 4
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # 32 x 2 x 2
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


model = SampleConvNet()
optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.5)

# %%
# The check Opacus' ModuleValidator does, before training:
print(ft.dp.validate(model, lambda out, y: F.cross_entropy(out, y, reduction="none"), images[:8], labels[:8]))

# %%
# The one changed call:
model, optimizer, train_loader = ft.dp.make_private(
    model, optimizer, train_loader, noise_multiplier=1.1, max_grad_norm=1.0
)

# %%
# Opacus' training loop, unchanged:
for epoch in range(1, 9):
    model.train()
    losses = []
    for data, target in train_loader:
        optimizer.zero_grad()
        output = model(data)
        loss = F.cross_entropy(output, target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        accuracy = (model(images[test]).argmax(1) == labels[test]).float().mean().item()
    epsilon = optimizer.get_epsilon(1e-5)
    print(
        f"epoch {epoch}: loss {sum(losses) / len(losses):.3f}, test accuracy {accuracy:.1%}, "
        f"epsilon {epsilon:.2f} (delta 1e-5)"
    )
