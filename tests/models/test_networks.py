"""Shapes of every network (2D and 3D where present), and the inputs that must raise."""

import pytest
import torch
from opacus.validators import ModuleValidator

from models import build_model
from models.autoencoder import classifier_init
from models.cgan_discriminator import ConditionalDiscriminator
from models.cgan_generator import ConditionalGenerator

SHAPES = [
    # name, in_channels, classes, size, dims, input shape, output shape
    ("cnn", 1, 2, 32, 2, (2, 1, 32, 32), (2, 2)),
    ("cnn", 3, 4, 64, 2, (1, 3, 64, 64), (1, 4)),
    ("unet", 1, 2, 32, 2, (2, 1, 32, 32), (2, 2, 32, 32)),
    ("unet", 3, 3, 64, 2, (1, 3, 64, 64), (1, 3, 64, 64)),
    ("unet", 1, 2, 16, 3, (1, 1, 16, 16, 16), (1, 2, 16, 16, 16)),
    ("autoencoder", 1, 2, 32, 2, (2, 1, 32, 32), (2, 1, 32, 32)),
    ("autoencoder", 3, 2, 64, 2, (1, 3, 64, 64), (1, 3, 64, 64)),
    ("autoencoder", 1, 2, 16, 3, (1, 1, 16, 16, 8), (1, 1, 16, 16, 8)),
]


@pytest.mark.parametrize(
    ("name", "channels", "classes", "size", "dims", "shape", "expected"), SHAPES
)
def test_output_shapes_and_opacus_compatibility(
    name, channels, classes, size, dims, shape, expected
):
    model = build_model(name, in_channels=channels, num_classes=classes, image_size=size, dims=dims)
    assert tuple(model(torch.rand(shape)).shape) == expected
    assert ModuleValidator.validate(model, strict=False) == []


@pytest.mark.parametrize(
    ("size", "dims", "shape", "spots"),
    [(32, 2, (2, 1, 32, 32), (2, 1, 4, 4)), (16, 3, (1, 1, 16, 16, 8), (1, 1, 2, 2, 1))],
)
def test_autoencoder_spot_map_comes_from_the_same_pass(size, dims, shape, spots):
    model = build_model("autoencoder", in_channels=1, num_classes=2, image_size=size, dims=dims)
    x = torch.rand(shape)
    reconstruction, spot_map = model(x, spots=True)
    assert tuple(spot_map.shape) == spots
    assert torch.equal(reconstruction, model(x))


@pytest.mark.parametrize(("channels", "classes", "size"), [(1, 2, 32), (3, 3, 64), (1, 2, 16)])
def test_gan_shapes(channels, classes, size):
    gan = build_model("cgan", in_channels=channels, num_classes=classes, image_size=size)
    z, c = torch.randn(3, gan.generator.latent_dim), torch.tensor([0, classes - 1, classes])
    images = gan.generator(z, c)
    assert images.shape == (3, channels, size, size)
    assert 0 <= float(images.min()) and float(images.max()) <= 1
    assert gan.discriminator(images, c).shape == (3,)
    assert ModuleValidator.validate(gan.discriminator, strict=False) == []
    keys = gan.state_dict().keys()
    assert all(k.startswith(("generator.", "discriminator.")) for k in keys)


MUST_RAISE = [
    (lambda: build_model("unet", in_channels=1, num_classes=2, image_size=30), "multiple of 4"),
    (lambda: build_model("unet", in_channels=2, num_classes=2, image_size=32), "in_channels"),
    (lambda: build_model("unet", in_channels=1, num_classes=1, image_size=32), "num_classes"),
    (lambda: build_model("unet", in_channels=1, num_classes=2, image_size=32, dims=4), "dims"),
    (lambda: build_model("autoencoder", in_channels=1, num_classes=2, image_size=20), "multiple"),
    (lambda: build_model("cgan", in_channels=1, num_classes=2, image_size=48), "power of two"),
    (lambda: build_model("cgan", in_channels=1, num_classes=2, image_size=32, dims=3), "2D only"),
    (lambda: build_model("vit", in_channels=1, num_classes=2, image_size=32), "unknown model"),
]


@pytest.mark.parametrize(("make", "message"), MUST_RAISE)
def test_bad_construction_raises(make, message):
    with pytest.raises(ValueError, match=message):
        make()


BAD_INPUTS = [
    ("unet", 2, (1, 1, 32, 32, 32)),  # 3D input to a 2D net
    ("unet", 2, (1, 3, 32, 32)),  # wrong channels
    ("unet", 2, (1, 1, 34, 34)),  # not divisible by 4 (a depth-2 U-Net)
    ("unet", 3, (1, 1, 32, 32)),  # 2D input to a 3D net
    ("autoencoder", 2, (1, 1, 32)),
]


@pytest.mark.parametrize(("name", "dims", "shape"), BAD_INPUTS)
def test_bad_inputs_raise(name, dims, shape):
    model = build_model(name, in_channels=1, num_classes=2, image_size=32, dims=dims)
    with pytest.raises(ValueError, match="expected input|divisible"):
        model(torch.rand(shape))


def test_gan_inputs_that_must_raise():
    g = ConditionalGenerator(image_size=32)
    d = ConditionalDiscriminator(image_size=32)
    with pytest.raises(ValueError, match="noise"):
        g(torch.randn(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="classes"):
        g(torch.randn(2, g.latent_dim), torch.tensor([0]))
    with pytest.raises(ValueError, match="images of shape"):
        d(torch.rand(2, 1, 16, 16), torch.tensor([0, 1]))


def test_autoencoder_encoder_initialises_the_classifier():
    torch.manual_seed(0)
    ae = build_model("autoencoder", in_channels=1, num_classes=2, image_size=32)
    cnn = build_model("cnn", in_channels=1, num_classes=2, image_size=32)
    merged = classifier_init(ae.state_dict(), cnn.state_dict())
    cnn.load_state_dict(merged)
    for key, value in ae.state_dict().items():
        if key.startswith("encoder."):
            assert torch.equal(cnn.state_dict()["features." + key[len("encoder."):]], value)
    other = build_model("autoencoder", in_channels=1, num_classes=2, image_size=32)
    wide = {k: torch.zeros(3, *v.shape[1:]) if k == "encoder.0.0.weight" else v
            for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="does not fit"):
        classifier_init(wide, cnn.state_dict())
    with pytest.raises(ValueError, match="no encoder"):
        classifier_init({"head.weight": torch.zeros(1)}, cnn.state_dict())


def test_gan_class_changes_the_generated_image():
    """The same noise with another class gives another image, at every class."""
    torch.manual_seed(0)
    g = ConditionalGenerator(image_size=32, num_classes=2)
    z = torch.randn(1, g.latent_dim).expand(3, -1)
    images = g(z, torch.tensor([0, 1, 2]))
    for a, b in [(0, 1), (0, 2), (1, 2)]:
        assert (images[a] - images[b]).abs().max() > 1e-4


def test_gan_discriminator_class_head_sees_the_image_only():
    """Realness depends on the class (projection); the class head cannot read the class."""
    torch.manual_seed(0)
    d = ConditionalDiscriminator(image_size=32, num_classes=2).eval()
    x = torch.rand(1, 1, 32, 32).expand(3, -1, -1, -1)
    realness, logits = d(x, torch.tensor([0, 1, 2]), class_logits=True)
    assert logits.shape == (3, 2)
    assert torch.allclose(logits[0], logits[1]) and torch.allclose(logits[0], logits[2])
    assert len(set(realness.tolist())) == 3


@pytest.mark.parametrize("size", [32, 64])
def test_every_encoder_block_reaches_the_classifier_and_computes_the_same_features(size):
    """Layer for layer: the classifier's feature blocks then compute the encoder's output."""
    torch.manual_seed(1)
    ae = build_model("autoencoder", in_channels=1, num_classes=2, image_size=size)
    torch.manual_seed(2)
    cnn = build_model("cnn", in_channels=1, num_classes=2, image_size=size)
    encoder = {k for k in ae.state_dict() if k.startswith("encoder.")}
    features = {k for k in cnn.state_dict() if k.startswith("features.")}
    # every feature parameter (convolutions and GroupNorms of all blocks) has an encoder twin
    assert {"features." + k[len("encoder."):] for k in encoder} == features
    assert len(ae.encoder) == len(cnn.features) == 3
    head_before = {k: v.clone() for k, v in cnn.state_dict().items() if k.startswith("head.")}
    cnn.load_state_dict(classifier_init(ae.state_dict(), cnn.state_dict()))
    x = torch.rand(3, 1, size, size)
    ae.eval()
    cnn.eval()
    with torch.no_grad():
        assert torch.equal(cnn.features(x), ae.encoder(x))
    for k, v in head_before.items():  # the head keeps its own (seeded) initialisation
        assert torch.equal(cnn.state_dict()[k], v)


def test_gan_state_is_float_arrays_that_load_from_a_plain_dict():
    """What a federated round delivers: a plain dict of arrays, averaged as floats."""
    torch.manual_seed(0)
    gan = build_model("cgan", in_channels=1, num_classes=2, image_size=32)
    gan.generator.sample(torch.tensor([0, 1, 2]))  # a training-mode pass moves BatchNorm's stats
    state = {k: v.clone() for k, v in gan.state_dict().items()}
    assert all(v.is_floating_point() for v in state.values())
    assert any(k.endswith("running_var") for k in state)
    other = build_model("cgan", in_channels=1, num_classes=2, image_size=32)
    other.load_state_dict(state, strict=True)
    for k, v in other.state_dict().items():
        assert torch.equal(v, state[k]), k
