import pytest
import torch
from torch import nn

from fewshot_nsl.backbones import CNN4, CNN9
from fewshot_nsl.registry import create_backbone, list_backbones
from fewshot_nsl.errors import RegistryError


def test_cnn4_shapes_follow_the_paper():
    net = create_backbone("cnn4")  # 32 filters, as in the paper
    assert net.forward_map(torch.zeros(2, 3, 84, 84)).shape == (2, 32, 5, 5)
    assert net.feature_dim(84) == 800
    assert create_backbone("cnn4", filters=64).feature_dim(84) == 1600


def test_cnn9_has_nine_convs_and_three_pools():
    net = create_backbone("cnn9", global_pool=False)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    pools = [m for m in net.modules() if isinstance(m, nn.MaxPool2d)]
    assert len(convs) == 10 and len(pools) == 3
    assert net.forward_map(torch.zeros(1, 3, 84, 84)).shape == (1, 256, 10, 10)
    assert create_backbone("cnn9").feature_dim(84) == 256


@pytest.mark.parametrize("name", list_backbones())
def test_backbone_uses_the_conv_factory_and_every_parameter_learns(name):
    made = []

    def factory(cin, cout, k, stride=1, padding=0, bias=True):
        conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, bias=bias)
        made.append(conv)
        return conv

    net = create_backbone(name, conv_layer=factory)
    assert made and all(any(m is c for m in net.modules()) for c in made)
    out = net(torch.randn(4, 3, 32, 32))
    assert torch.isfinite(out).all()
    out.pow(2).mean().backward()
    for pname, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


def test_unknown_backbone_option_lists_accepted():
    with pytest.raises(RegistryError, match="accepted: bn_eps, conv_layer, filters"):
        create_backbone("cnn4", filterz=3)
    with pytest.raises(RegistryError, match="unknown backbone 'resnet'"):
        create_backbone("resnet")
