"""Less common graphs: each must either be understood (a planted permutation keeps the function and
fusion recovers the model) or be refused with a clear error."""

import pytest
import torch
import torch.nn.functional as F
from helpers import fuse, max_state_diff, permuted
from torch import nn

import otfuse


class TokenMLP(nn.Module):
    """A Linear on the last axis of (B, T, C), then flattened: the units repeat along the axis."""

    def __init__(self):
        super().__init__()
        self.l, self.fc = nn.Linear(5, 8), nn.Linear(8 * 6, 3)

    def forward(self, x):
        return self.fc(F.relu(self.l(x)).flatten(1))


class ChannelsLast(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.l, self.fc = (
            nn.Conv2d(3, 4, 3, padding=1),
            nn.Linear(4, 6),
            nn.Linear(6 * 16, 2),
        )

    def forward(self, x):
        return self.fc(F.relu(self.l(F.relu(self.c(x)).permute(dims=(0, 2, 3, 1)))).flatten(1))


class Shared(nn.Module):
    """One Linear called twice, and one BatchNorm applied to two branches."""

    def __init__(self):
        super().__init__()
        self.l, self.h, self.fc = nn.Linear(10, 8), nn.Linear(8, 8), nn.Linear(16, 3)
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x):
        h = F.relu(self.l(x))
        h = F.relu(self.h(F.relu(self.h(h))))
        return self.fc(torch.cat([self.bn(h), self.bn(F.relu(self.l(x)))], 1))


class Transposed(nn.Module):
    def __init__(self):
        super().__init__()
        self.l, self.fc = nn.Linear(10, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(F.relu(self.l(x)).T.T)


class Ellipsis(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.fc = nn.Conv2d(3, 6, 3, padding=1), nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(F.relu(self.c(x))[..., 0, 0])


class SquareResidual(nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.a, self.f, self.fc = nn.Linear(10, width), nn.Linear(width, width), nn.Linear(width, 3)

    def forward(self, x):
        h = self.a(x)
        return self.fc(h + F.relu(self.f(h)))


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.l, self.a, self.b = nn.Linear(10, 8), nn.Linear(8, 3), nn.Linear(8, 2)

    def forward(self, x):
        h = F.relu(self.l(x))
        return self.a(h), self.b(h)


CASES = [
    (TokenMLP, (6, 5)),
    (ChannelsLast, (3, 4, 4)),
    (Shared, (10,)),
    (Transposed, (10,)),
    (Ellipsis, (3, 4, 4)),
    (SquareResidual, (10,)),
]


@pytest.mark.parametrize("cls, shape", CASES, ids=[c.__name__ for c, _ in CASES])
def test_planted_permutation_keeps_function_and_is_recovered(cls, shape):
    torch.manual_seed(0)
    model, x = cls().eval(), torch.randn(4, *shape)
    other, _ = permuted(model, x, seed=2)
    torch.testing.assert_close(other(x), model(x), atol=1e-5, rtol=1e-5)
    assert max_state_diff(fuse([model, other], example_input=x).model, model) < 1e-5


def test_refinement_across_widths_with_a_square_weight_in_the_stream():
    x = torch.randn(4, 10)
    result = otfuse.fuse(
        [SquareResidual(8), SquareResidual(12)], recipe="data-free", example_input=x
    )
    assert torch.isfinite(result.model(x)).all()


def test_data_recipe_with_tuple_outputs_and_models_keep_their_mode():
    models = [TwoHeads().train(), TwoHeads().train()]
    result = otfuse.fuse(models, data=torch.randn(64, 10))
    assert all(m.training for m in models)
    # the fused model comes back in the anchor's mode, as paper-wts and align give it
    assert all(m.training for m in result.model.modules())
    models[0].eval()
    assert not any(
        m.training for m in otfuse.fuse(models, data=torch.randn(64, 10)).model.modules()
    )
    assert all(torch.isfinite(t).all() for t in result.model(torch.randn(2, 10)))
