"""A1111's noise sources CPU / GPU / NV through difusi.rng and the samplers' ImageNoiseSampler.

Still needing a real GPU (see tests/rng/test_cuda_reference.py and tools/record_cuda_randn.py): that NV
equals torch.randn on CUDA beyond the seed-0 3x4 known answer (more seeds, latent-sized shapes, offsets
1..2, seeds above 2^32, the global generator used for subseeds), and that the GPU source on "cuda" draws
from torch's CUDA generator.
"""

import numpy as np
import pytest
import torch

from difusi.errors import ParamError
from difusi.philox import PhiloxGenerator, cuda_randn
from difusi.rng import RNG_SOURCES, create_generator, generator_device, image_noise, randn, slerp
from difusi.samplers import build_sigmas, get_sampler
from difusi.samplers.denoiser import DiscreteNoiseTable
from difusi.samplers.noise import ImageNoiseSampler

SHAPE = (4, 8, 8)
NO_CUDA = not torch.cuda.is_available()


def cpu_randn(shape, seed, calls=1):
    generator = torch.Generator("cpu").manual_seed(seed)
    for _ in range(calls - 1):
        torch.randn(shape, generator=generator)
    return torch.randn(shape, generator=generator)


def nv(seed, shape, offset=0):
    return torch.from_numpy(cuda_randn(seed, shape, offset))


def test_sources():
    assert RNG_SOURCES == ("CPU", "GPU", "NV")
    with pytest.raises(ParamError) as error:
        randn((2,), 1, source="cuda")
    assert error.value.field == "rng"


def test_cpu_source_is_torch_cpu_randn_bit_for_bit():
    assert torch.equal(randn((3, 4), 11), cpu_randn((3, 4), 11))
    assert torch.equal(randn((3, 4), 11, offset=2), cpu_randn((3, 4), 11, calls=3))
    assert randn((3, 4), 11).dtype == torch.float32


def test_nv_source_is_the_cuda_emulation():
    assert torch.equal(randn((1, *SHAPE), 3, source="NV"), nv(3, (1, *SHAPE)))
    assert torch.equal(randn((1, *SHAPE), 3, source="NV", offset=2), nv(3, (1, *SHAPE), offset=2))
    assert randn((2,), 3, source="NV").dtype == torch.float32


def test_gpu_source_on_the_cpu_is_the_cpu_generator():
    # A1111 with "GPU" on a CPU (or MPS) device seeds torch.Generator on the CPU: the same noise as "CPU".
    assert torch.equal(randn((3, 4), 11, source="GPU"), cpu_randn((3, 4), 11))
    assert torch.equal(randn((3, 4), 11, source="GPU", offset=1), cpu_randn((3, 4), 11, calls=2))
    assert generator_device("GPU", "mps") == torch.device("cpu")
    assert generator_device("GPU", "cpu") == torch.device("cpu")
    assert generator_device("NV", "cuda") == torch.device("cpu")


@pytest.mark.skipif(not NO_CUDA, reason="checks the CPU-only refusal")
def test_gpu_source_without_the_gpu_is_refused():
    with pytest.raises(ParamError) as error:
        randn((3, 4), 11, source="GPU", device="cuda")
    assert error.value.field == "rng" and "cuda" in error.value.message
    with pytest.raises(ParamError):
        image_noise([1], SHAPE, source="GPU", device="cuda")


@pytest.mark.skipif(NO_CUDA, reason="needs CUDA")
def test_gpu_source_on_cuda_is_torch_cuda_randn():
    expected = torch.randn((3, 4), generator=torch.Generator("cuda").manual_seed(11), device="cuda")
    assert torch.equal(randn((3, 4), 11, source="GPU", device="cuda"), expected)


def test_default_image_noise_is_unchanged():
    """The pre-source implementation, written out: CPU generator per seed, subseed noise slerped in."""
    seeds, subseeds = [5, 6], [70, 71]
    drawn = image_noise(seeds, SHAPE, subseeds, 0.3)
    for i, seed in enumerate(seeds):
        generator = torch.Generator("cpu").manual_seed(seed)
        main = torch.randn((1, *SHAPE), generator=generator, dtype=torch.float32)
        sub = torch.randn((1, *SHAPE), generator=torch.Generator("cpu").manual_seed(subseeds[i]))
        assert torch.equal(drawn.noise[i:i + 1], slerp(0.3, main, sub))
        assert torch.equal(torch.randn(3, generator=drawn.generators[i]), torch.randn(3, generator=generator))
    assert torch.equal(image_noise(seeds, SHAPE).noise, torch.cat([cpu_randn((1, *SHAPE), s) for s in seeds]))


def test_nv_image_noise_uses_seed_plus_i_and_leaves_draw_1_for_the_sampler():
    seed = 1000
    drawn = image_noise([seed, seed + 1, seed + 2], SHAPE, source="NV")
    assert drawn.noise.dtype == torch.float32 and drawn.noise.shape == (3, *SHAPE)
    for i, generator in enumerate(drawn.generators):
        assert isinstance(generator, PhiloxGenerator) and generator.seed == seed + i and generator.offset == 1
        assert torch.equal(drawn.noise[i:i + 1], nv(seed + i, (1, *SHAPE)))


def test_nv_subseed_noise_comes_from_the_same_source():
    drawn = image_noise([8], SHAPE, [90], 0.25, source="NV")
    assert torch.equal(drawn.noise, slerp(0.25, nv(8, (1, *SHAPE)), nv(90, (1, *SHAPE))))
    assert drawn.generators[0].offset == 1  # the subseed's draw does not advance the image's generator


def test_image_noise_sampler_follows_the_nv_source():
    seeds = [21, 22]
    drawn = image_noise(seeds, SHAPE, source="NV")
    x = torch.zeros(2, *SHAPE, dtype=torch.float64)
    sampler_noise = ImageNoiseSampler(drawn.generators, x)
    first, second = sampler_noise(1.0, 0.5), sampler_noise(0.5, 0.2)
    assert first.dtype == torch.float64
    for i, seed in enumerate(seeds):
        assert torch.equal(first[i:i + 1], nv(seed, (1, *SHAPE), offset=1).double())
        assert torch.equal(second[i:i + 1], nv(seed, (1, *SHAPE), offset=2).double())


def test_image_noise_sampler_still_takes_torch_generators():
    x = torch.zeros(2, *SHAPE)
    noise = ImageNoiseSampler([torch.Generator().manual_seed(s) for s in (7, 8)], x)()
    assert torch.equal(noise, torch.cat([cpu_randn((1, *SHAPE), s) for s in (7, 8)]))


def run_euler_a(seeds, source):
    """Euler a with the exact denoiser of unit Gaussian data, E[x0 | x] = x / (1 + sigma^2)."""
    sampler = get_sampler("Euler a")
    sigmas = build_sigmas(sampler, "Automatic", 6, DiscreteNoiseTable()).float()
    drawn = image_noise(seeds, SHAPE, source=source)
    x = drawn.noise * sigmas[0]
    return sampler(lambda x, sigma: x / (1 + sigma.view(-1, 1, 1, 1) ** 2), x, sigmas,
                   noise_sampler=ImageNoiseSampler(drawn.generators, x)), drawn.generators


def test_ancestral_sampling_with_nv_is_per_image_and_advances_one_offset_per_step():
    batch, generators = run_euler_a([3, 4], "NV")
    singles = torch.cat([run_euler_a([s], "NV")[0] for s in (3, 4)])
    assert torch.equal(batch, singles)
    assert [g.offset for g in generators] == [6, 6]  # draw 0 initial noise, draws 1..5 for steps 1..5
    cpu, _ = run_euler_a([3, 4], "CPU")
    assert not torch.allclose(batch, cpu)


def test_create_generator_kinds():
    assert isinstance(create_generator(1, "NV"), PhiloxGenerator)
    generator = create_generator(1, "CPU")
    assert isinstance(generator, torch.Generator) and generator.device == torch.device("cpu")
    with pytest.raises(ParamError) as error:
        create_generator(-1, "NV")
    assert error.value.field == "seed"
    assert np.array_equal(randn((4,), 2**40, source="NV").numpy(), cuda_randn(2**40, (4,)))
