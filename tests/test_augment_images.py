"""augment_images (torch.ops.mlellp.augment_images) against torchvision's functional
transforms image by image, on every device, and every bad input."""
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from conftest import DEVICES
from mlellp_ext.image_ops import BRIGHTNESS, CONTRAST, HUE, NO_OP, SATURATION, augment_images

TV = {BRIGHTNESS: TF.adjust_brightness, CONTRAST: TF.adjust_contrast, SATURATION: TF.adjust_saturation,
      HUE: TF.adjust_hue}


def reference(images, flip, sigma, order, factors):
    """torchvision, one image at a time."""
    out = []
    for i in range(images.shape[0]):
        img = images[i]
        if flip[i]:
            img = TF.horizontal_flip(img)
        if sigma[i] > 0:
            img = TF.gaussian_blur(img, [3, 3], [float(sigma[i])] * 2)
        for op in order[i].tolist():
            if op != NO_OP:
                img = TV[op](img, float(factors[i, op] if op != HUE else factors[i, 3]))
        out.append(img)
    return torch.stack(out)


def random_params(gen, n, ops=(BRIGHTNESS, CONTRAST, SATURATION, HUE), dtype=torch.float64):
    flip = torch.rand(n, generator=gen) < 0.5
    sigma = torch.where(torch.rand(n, generator=gen) < 0.7, 0.05 + 1.5 * torch.rand(n, generator=gen), 0.0)
    order = torch.full((n, 4), NO_OP)
    for i in range(n):
        chosen = [op for op in ops if torch.rand(1, generator=gen) < 0.7]
        chosen = [chosen[j] for j in torch.randperm(len(chosen), generator=gen)]
        order[i, :len(chosen)] = torch.tensor(chosen, dtype=torch.long)
    factors = torch.cat((0.5 + torch.rand(n, 3, generator=gen), 0.3 * torch.rand(n, 1, generator=gen) - 0.15), 1)
    return flip, sigma.to(dtype), order, factors.to(dtype)


def identity_factors(n):
    return torch.tensor([[1.0, 1.0, 1.0, 0.0]]).repeat(n, 1)


def on(device, *tensors):
    return [t.to(device) for t in tensors]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", [BRIGHTNESS, CONTRAST, SATURATION])
def test_each_jitter_equals_torchvision(gen, device, op):
    x = torch.rand(7, 3, 9, 6, generator=gen, dtype=torch.float64)
    n = x.shape[0]
    order = torch.full((n, 4), NO_OP)
    order[:, int(torch.randint(0, 4, (1,), generator=gen))] = op  # any slot
    factors = torch.cat((0.3 + 1.4 * torch.rand(n, 3, generator=gen, dtype=torch.float64),
                         torch.zeros(n, 1, dtype=torch.float64)), 1)
    factors[0, op] = 0.0  # a factor of zero is allowed (grey or black image)
    params = (torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.float64), order, factors)
    out = augment_images(*on(device, x, *params))
    torch.testing.assert_close(out.cpu(), reference(x, *params), rtol=0, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_hue_equals_torchvision(gen, device):
    """torchvision's adjust_hue computes in float32 whatever the dtype."""
    x = torch.rand(8, 3, 7, 9, generator=gen)
    x[0, :, :3] = x[0, 0, :3]  # grey pixels (no hue)
    x[1, 0] = 1.0  # saturated red channel
    n = x.shape[0]
    order = torch.full((n, 4), NO_OP)
    order[:, 0] = HUE
    shift = torch.linspace(-0.5, 0.5, n)
    factors = torch.cat((torch.ones(n, 3), shift.unsqueeze(1)), 1)
    params = (torch.zeros(n, dtype=torch.bool), torch.zeros(n), order, factors)
    out = augment_images(*on(device, x, *params)).cpu()
    torch.testing.assert_close(out, reference(x, *params), rtol=0, atol=2e-6)
    # and in float64 the conversion round trip is exact to rounding
    params64 = (params[0], params[1].double(), order, torch.cat((torch.ones(n, 3), torch.zeros(n, 1)), 1).double())
    torch.testing.assert_close(augment_images(*on(device, x.double(), *params64)).cpu(), x.double(), rtol=0,
                               atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(9, 7), (2, 2), (3, 16), (32, 32)])
def test_flip_and_blur_equal_torchvision(gen, device, shape):
    x = torch.rand(6, 3, *shape, generator=gen, dtype=torch.float64)
    flip = torch.tensor([True, False, True, False, True, False])
    sigma = torch.tensor([0.0, 0.1, 0.37, 0.9, 1.0, 3.0], dtype=torch.float64)
    order = torch.full((6, 4), NO_OP)
    factors = torch.ones(6, 4, dtype=torch.float64)
    factors[:, 3] = 0
    params = (flip, sigma, order, factors)
    torch.testing.assert_close(augment_images(*on(device, x, *params)).cpu(), reference(x, *params), rtol=0,
                               atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_a_side_of_one_pixel_is_blurred_with_replicate_padding(gen, device):
    """torch's reflect padding needs two pixels; a single row or column repeats (the
    other side still reflects)."""
    for shape in [(1, 5), (4, 1), (1, 1)]:
        x = torch.rand(1, 3, *shape, generator=gen, dtype=torch.float64)
        sigma = 0.8
        k1 = torch.exp(-torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64) / (2 * sigma ** 2))
        k1 = k1 / k1.sum()
        kernel = (k1[:, None] * k1[None, :]).expand(3, 1, 3, 3)
        mode = lambda size: "reflect" if size > 1 else "replicate"  # noqa: E731
        padded = F.pad(F.pad(x, (1, 1, 0, 0), mode=mode(shape[1])), (0, 0, 1, 1), mode=mode(shape[0]))
        ref = F.conv2d(padded, kernel, groups=3)
        params = (torch.tensor([False]), torch.tensor([sigma], dtype=torch.float64), torch.full((1, 4), NO_OP),
                  torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=torch.float64))
        torch.testing.assert_close(augment_images(*on(device, x, *params)).cpu(), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_hue", [False, True])
def test_random_combinations_equal_torchvision(gen, device, with_hue):
    x = torch.rand(40, 3, 11, 8, generator=gen, dtype=torch.float64)
    ops = (BRIGHTNESS, CONTRAST, SATURATION, HUE) if with_hue else (BRIGHTNESS, CONTRAST, SATURATION)
    params = random_params(gen, x.shape[0], ops)
    out = augment_images(*on(device, x, *params)).cpu()
    # hue: torchvision's float32 conversion, once per image
    torch.testing.assert_close(out, reference(x, *params), rtol=0, atol=1e-5 if with_hue else 1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_training_dtypes_equal_torchvision(gen, device, dtype):
    """float32 and uint8 (what training feeds it) against torchvision on the float32
    image; uint8 is read as value / 255 (torchvision's own to_dtype multiplies by
    float32(1/255), one rounding step apart at most)."""
    x = torch.randint(0, 256, (40, 3, 11, 8), generator=gen, dtype=torch.uint8)
    params = random_params(gen, x.shape[0], (BRIGHTNESS, CONTRAST, SATURATION), dtype=torch.float32)
    images = x if dtype == torch.uint8 else x.float() / 255
    out = augment_images(*on(device, images, *params)).cpu()
    torch.testing.assert_close(out, reference(x.float() / 255, *params), rtol=0, atol=2e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_parameters_may_be_on_the_cpu(gen, device):
    x = torch.rand(9, 3, 7, 7, generator=gen).to(device)
    params = random_params(gen, 9, dtype=torch.float32)
    torch.testing.assert_close(augment_images(x, *params), augment_images(x, *on(device, *params)), rtol=0, atol=0)
    out = augment_images(x.to("meta"), *params)  # the fake kernel takes the same arguments
    assert out.device.type == "meta" and out.shape == x.shape


@pytest.mark.parametrize("device", DEVICES)
def test_nothing_to_do_returns_the_images(gen, device):
    x = torch.rand(5, 3, 6, 4, generator=gen)
    params = (torch.zeros(5, dtype=torch.bool), torch.zeros(5), torch.full((5, 4), NO_OP), identity_factors(5))
    out = augment_images(*on(device, x, *params))
    assert torch.equal(out.cpu(), x) and out.data_ptr() != x.data_ptr()


@pytest.mark.parametrize("device", DEVICES)
def test_layouts_and_low_precision(gen, device):
    x = torch.rand(12, 3, 10, 10, generator=gen)
    params = random_params(gen, 12, dtype=torch.float32)
    expected = augment_images(*on(device, x, *params))
    # channels_last, a strided view, strided parameters
    cl = x.to(memory_format=torch.channels_last)
    wide = torch.rand(12, 3, 10, 20, generator=gen)
    wide[..., ::2] = x
    strided = [torch.stack((p, p), 1)[:, 0] for p in params]  # every parameter a strided view
    assert not any(p.is_contiguous() for p in strided if p.dim() == 2)
    for images, ps in [(cl, params), (wide[..., ::2], strided)]:
        out = augment_images(*on(device, images, *ps))
        assert out.is_contiguous()
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
    for dtype in (torch.float16, torch.bfloat16):
        out = augment_images(*on(device, x.to(dtype), *params))
        assert out.dtype == dtype and out.shape == x.shape
        torch.testing.assert_close(out.float(), expected, rtol=0, atol=1e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_uint8_images_are_read_as_value_over_255(gen, device):
    x = torch.randint(0, 256, (30, 3, 9, 8), generator=gen, dtype=torch.uint8)
    params = random_params(gen, 30, dtype=torch.float32)
    out = augment_images(*on(device, x, *params))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, augment_images(*on(device, x.float() / 255, *params)), rtol=0, atol=0)


def test_every_image_is_augmented_whatever_the_thread_count(gen):
    x = torch.rand(300, 3, 8, 8, generator=gen)
    params = random_params(gen, 300, dtype=torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = augment_images(x, *params)
        torch.set_num_threads(max(2, threads))
        assert torch.equal(augment_images(x, *params), one)
    finally:
        torch.set_num_threads(threads)


def test_empty_batches_and_images():
    for shape in [(0, 3, 4, 4), (2, 3, 0, 5)]:
        n = shape[0]
        out = augment_images(torch.rand(shape), torch.zeros(n, dtype=torch.bool), torch.zeros(n),
                             torch.full((n, 4), NO_OP), identity_factors(n))
        assert out.shape == shape


@pytest.mark.parametrize("channel", [0, 1, 2])
def test_hue_of_a_pixel_with_one_nan_channel_is_nan(channel):
    """As torchvision: a comparison with NaN is false, so the channel must not be passed over."""
    x = torch.tensor([0.3, 0.4, 0.5]).view(1, 3, 1, 1).repeat(1, 1, 2, 2)
    x[0, :, 0, 1] = 0.5  # g == b where r is the NaN
    x[0, channel, 0, :] = float("nan")
    params = (torch.tensor([False]), torch.tensor([0.0]), torch.tensor([[HUE, -1, -1, -1]]),
              torch.tensor([[1.0, 1.0, 1.0, 0.1]]))
    out = augment_images(x, *params)
    ref = reference(x, *params)
    assert torch.equal(out.isnan(), ref.isnan()) and out[0, :, 0].isnan().all()
    torch.testing.assert_close(out[0, :, 1], ref[0, :, 1], rtol=0, atol=2e-6)


def test_nan_pixels_stay_in_their_image(gen):
    x = torch.rand(3, 3, 5, 5, generator=gen)
    x[1, :, 2, 2] = float("nan")
    order = torch.tensor([[HUE, CONTRAST, SATURATION, BRIGHTNESS]] * 3)
    factors = torch.tensor([[1.1, 0.9, 1.2, 0.1]] * 3)
    out = augment_images(x, torch.tensor([True, True, False]), torch.tensor([0.5, 0.5, 0.0]), order, factors)
    assert out[[0, 2]].isfinite().all() and out[1].isnan().any()


def test_opcheck_and_compile(gen):
    x = torch.rand(4, 3, 6, 5, generator=gen)
    params = random_params(gen, 4, dtype=torch.float32)
    torch.library.opcheck(torch.ops.mlellp.augment_images, (x, *params))
    compiled = torch.compile(lambda im, *p: augment_images(im * 0.5, *p) + 1.0, fullgraph=True)
    torch.testing.assert_close(compiled(x, *params), augment_images(x * 0.5, *params) + 1.0)


def good(n=2):
    return [torch.rand(n, 3, 4, 4), torch.zeros(n, dtype=torch.bool), torch.zeros(n), torch.full((n, 4), NO_OP),
            identity_factors(n)]


BAD_LAYOUT = [
    (0, torch.rand(2, 4, 4, 4), r"images must be \(B, 3, H, W\) RGB images, got shape \[2, 4, 4, 4\]"),
    (0, torch.rand(3, 4, 4), r"images must be \(B, 3, H, W\)"),
    (0, torch.zeros(2, 3, 4, 4, dtype=torch.int32),
     r"images must be uint8 \(0..255\) or float32, float64, float16 or bfloat16 \(in \[0, 1\]\), got Int"),
    (1, torch.zeros(3, dtype=torch.bool), r"flip must have shape \[2\] \(one value per image\), got \[3\]"),
    (1, torch.zeros(2), r"flip must be bool, got Float"),
    (2, torch.zeros(2, 1), r"blur_sigma must have shape \[2\]"),
    (2, torch.zeros(2, dtype=torch.long), r"blur_sigma must be float32, float64, float16 or bfloat16, got Long"),
    (3, torch.full((2, 3), NO_OP), r"jitter_order must have shape \[2, 4\] \(one row per image\), got \[2, 3\]"),
    (3, torch.full((2, 4), NO_OP, dtype=torch.int32), r"jitter_order must be int64, got Int"),
    (4, torch.ones(4), r"jitter_factors must have shape \[2, 4\]"),
    (4, torch.ones(2, 4, dtype=torch.long), r"jitter_factors must be float32"),
]
BAD_VALUES = [
    (2, torch.tensor([0.0, -0.5]), r"blur_sigma\[1\] must be finite and >= 0 \(0: no blur\), got -0.5"),
    (2, torch.tensor([float("nan"), 0.0]), r"blur_sigma\[0\] must be finite and >= 0 \(0: no blur\), got nan"),
    (2, torch.tensor([float("inf"), 0.0]), r"blur_sigma\[0\] must be finite"),
    (3, torch.tensor([[-1, -1, -1, -1], [0, 4, -1, -1]]), r"jitter_order\[1\] = \[0, 4, -1, -1\]: each entry must be -1"),
    (3, torch.tensor([[-2, -1, -1, -1], [0, 1, 2, 3]]), r"jitter_order\[0\] = \[-2, -1, -1, -1\]"),
    (3, torch.tensor([[3, 1, 3, -1], [0, 1, 2, 3]]), r"jitter_order\[0\] = \[3, 1, 3, -1\].*each operation at most once"),
    (4, torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, -0.1, 1.0, 0.0]]),
     r"jitter_factors\[1, 1\] \(contrast\) must be finite and >= 0, got -0.1"),
    (4, torch.tensor([[float("inf"), 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0]]), r"jitter_factors\[0, 0\] \(brightness\)"),
    (4, torch.tensor([[1.0, 1.0, float("nan"), 0.0], [1.0, 1.0, 1.0, 0.0]]), r"jitter_factors\[0, 2\] \(saturation\)"),
    (4, torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.75]]),
     r"jitter_factors\[1, 3\] \(hue shift\) must be in \[-0.5, 0.5\], got 0.75"),
    (4, torch.tensor([[1.0, 1.0, 1.0, float("nan")], [1.0, 1.0, 1.0, 0.0]]), r"jitter_factors\[0, 3\] \(hue shift\)"),
    # float32 images are computed in float32: a factor finite only in float64 is refused
    (4, torch.tensor([[1.0, 1e39, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0]], dtype=torch.float64),
     r"jitter_factors\[0, 1\] \(contrast\) = 1e\+39 is beyond float32's range, the dtype these images are "
     r"computed in"),
    (2, torch.tensor([0.0, 1e39], dtype=torch.float64), r"blur_sigma\[1\] = 1e\+39 is beyond float32's range"),
]


@pytest.mark.parametrize("index, value, message", BAD_LAYOUT + BAD_VALUES)
def test_bad_input_names_the_argument_and_value(index, value, message):
    args = good()
    args[index] = value
    with pytest.raises(ValueError, match=message):
        augment_images(*args)


@pytest.mark.parametrize("index, value, message", BAD_LAYOUT)
def test_fake_kernel_gives_the_same_errors(index, value, message):
    args = [t.to("meta") for t in good()]
    args[index] = value.to("meta")
    with pytest.raises(ValueError, match=message):
        augment_images(*args)


def test_devices_must_match():
    args = good()
    args[2] = args[2].to("meta")
    with pytest.raises(ValueError, match="blur_sigma is on meta but images is on cpu"):
        augment_images(*args)
