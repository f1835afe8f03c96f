"""X/Y/Z plot (issue 16 deliverable 5): axis parsing, grid drawing, an end-to-end plot on difusi-mini whose cells are
byte-identical to `difusi generate`, and the A1111 `script_args` mapping of the HTTP API."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from difusi.batch import xyz
from difusi.batch.grid import draw_grid
from difusi.batch.xyz import AxisError, parse_axis
from difusi.errors import ParamError
from difusi.params import GenerationParams

# ----------------------------------------------------------------------------------------------- axis parsing


@pytest.mark.parametrize(("text", "field", "values"), [
    ("steps=10,20,40", "steps", (10, 20, 40)),
    ("Steps=1-5", "steps", (1, 2, 3, 4, 5)),
    ("steps=1-5 (+2)", "steps", (1, 3, 5)),
    ("steps = 1 - 9 ( +4 )", "steps", (1, 5, 9)),
    ("steps=10-40 [4]", "steps", (10, 20, 30, 40)),
    ("steps=5-1 (-2)", "steps", (5, 3, 1)),
    ("steps=1-3, 10", "steps", (1, 2, 3, 10)),
    ("CFG Scale=1.0-2.0 (+0.5)", "cfg_scale", (1.0, 1.5, 2.0)),
    ("cfg_scale=0.5-1.5 [3]", "cfg_scale", (0.5, 1.0, 1.5)),
    ("cfg_scale=0.1-0.3 (+0.1)", "cfg_scale", (0.1, 0.2, 0.3)),
    ("cfg_scale=7", "cfg_scale", (7.0,)),
    ("seed=-1", "seed", None),  # fixed later; parsing keeps -1
    ("Seed=1,2", "seed", (1, 2)),
    ("Var. seed=3", "subseed", (3,)),
    ("Var. strength=0-1 [3]", "subseed_strength", (0.0, 0.5, 1.0)),
    ('sampler_name="Euler a", DPM++ 2M', "sampler_name", ("Euler a", "DPM++ 2M")),
    ("Sampler=Euler a,Euler", "sampler_name", ("Euler a", "Euler")),
    ("Sampling method=Euler", "sampler_name", ("Euler",)),
    ("Schedule type=Karras,Automatic", "scheduler", ("Karras", "Automatic")),
    ("width=64,128", "width", (64, 128)),
    ("Clip skip=1-2", "clip_skip", (1, 2)),
    ("RNG source=CPU,NV", "rng", ("CPU", "NV")),
])
def test_axis_values(text, field, values):
    axis = parse_axis(text, "x")
    assert axis.type.field == field
    if values is not None:
        assert axis.values == values
        assert all(type(v) is type(values[0]) for v in axis.values)


def test_negative_numbers_and_ranges_parse():
    assert xyz._expand_range("-5--1", int, "X") == [-5, -4, -3, -2, -1]
    assert xyz._expand_range("-1.5-0.5 (+1)", float, "X") == [-1.5, -0.5, 0.5]
    assert xyz._expand_range("-1", int, "X") is None  # a plain negative number, not a range
    assert parse_axis("seed=-1, 5", "x").values == (-1, 5)


def test_prompt_sr_replaces_in_prompt_and_negative_prompt():
    axis = parse_axis('Prompt S/R=red, "blue, dark", green', "y", prompt="a red circle", negative_prompt="red")
    assert axis.values == ("red", "blue, dark", "green")
    assert axis.labels() == ["red", "blue, dark", "green"]
    params = GenerationParams(prompt="a red circle", negative_prompt="red", steps=1, seed=1)
    planned = xyz.plan(params, axis)
    assert [c.params.prompt for c in planned.cells] == ["a red circle", "a blue, dark circle", "a green circle"]
    assert [c.params.negative_prompt for c in planned.cells] == ["red", "blue, dark", "green"]


def test_lora_multiplier_sweep_is_prompt_sr():
    axis = parse_axis("Prompt S/R=<lora:style:0.5>,<lora:style:1>", "x", prompt="a cat <lora:style:0.5>")
    planned = xyz.plan(GenerationParams(prompt="a cat <lora:style:0.5>", seed=1), axis)
    assert [c.params.prompt for c in planned.cells] == ["a cat <lora:style:0.5>", "a cat <lora:style:1>"]


@pytest.mark.parametrize(("text", "axis", "needle"), [
    ("Prompt S/R=dog,cat", "x", "'dog'"),  # search term missing from both prompts
    ("steps=0,5", "y", "Y axis (Steps): '0'"),  # out of range names the axis and the value
    ("cfg_scale=1,200", "x", "'200'"),
    ("width=65", "x", "multiple of 8"),
    ("steps=abc", "z", "Z axis (Steps): 'abc'"),
    ("steps=1.5", "x", "'1.5'"),
    ("nonsense=1", "x", "unknown axis type 'nonsense'"),
    ("Styles=a,b", "x", "not supported"),
    ("steps", "x", "TYPE=VALUES"),
    ("steps=", "x", "no values"),
    ("steps=1-5 (+0)", "x", "step of 0"),
    ("steps=5-1 (+1)", "x", "empty"),
    ("sampler_name=Nope", "x", "'Nope'"),
    ("scheduler=Nope", "x", "'Nope'"),
    ("steps=1-100000", "x", "more than"),
    ("Checkpoint name=no-such-model", "x", "'no-such-model'"),
])
def test_axis_errors_name_axis_and_value(text, axis, needle, tmp_path):
    with pytest.raises(AxisError) as raised:
        parse_axis(text, axis, prompt="a cat", models_dir=tmp_path)
    assert raised.value.field == axis
    assert needle in str(raised.value)
    assert f"{axis.upper()} axis" in str(raised.value)


def test_axis_labels_come_from_the_field_table():
    # Every field-table spelling reaches the same axis: A1111 name, UI label, infotext key, A1111 axis label.
    for spelling in ("cfg_scale", "CFG scale", "CFG Scale", "cfg scale"):
        assert parse_axis(f"{spelling}=3", "x").type.field == "cfg_scale"
    for spelling in ("steps", "Sampling steps", "Steps"):
        assert parse_axis(f"{spelling}=3", "x").type.field == "steps"
    assert parse_axis("Checkpoint name=difusi-mini", "x").type.kind == xyz.CHECKPOINT
    assert parse_axis("model=difusi-mini", "x").type.kind == xyz.CHECKPOINT
    assert parse_axis("Nothing=", "x").is_nothing
    assert parse_axis("CFG Scale=3,7.5", "x").labels() == ["CFG Scale: 3", "CFG Scale: 7.5"]
    assert parse_axis("Sampler=Euler", "x").labels() == ["Euler"]


def test_plan_fixes_seeds_once_and_validates_every_cell():
    planned = xyz.plan(GenerationParams(prompt="p", steps=1), parse_axis("steps=1,2", "x"),
                       parse_axis("seed=-1,7", "y"))
    seeds = [c.params.seed for c in planned.cells]
    assert seeds[0] == seeds[1] != -1 and seeds[2:] == [7, 7]
    assert [(c.x, c.y) for c in planned.cells] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    kept = xyz.plan(GenerationParams(prompt="p", steps=1), parse_axis("seed=-1,7", "x"), fix_seeds=False)
    assert [c.params.seed for c in kept.cells] == [-1, 7]  # A1111's "Keep -1 for seeds"
    with pytest.raises(ParamError, match="cell"):  # width x height over the memory budget only in one cell
        xyz.plan(GenerationParams(prompt="p", width=4096), parse_axis("height=64,4096", "x"))


def test_plots_too_large_to_draw_are_refused_before_planning():
    with pytest.raises(AxisError, match="1000000 cells"):
        xyz.plan(GenerationParams(prompt="p"), parse_axis("steps=1-1000", "x"), parse_axis("seed=1-1000", "y"))
    with pytest.raises(AxisError, match="megapixels"):  # A1111's 200 MP grid limit
        xyz.plan(GenerationParams(prompt="p", width=2048, height=2048), parse_axis("steps=1-50", "x"))


def test_grid_infotext_has_a1111_script_keys():
    planned = xyz.plan(GenerationParams(prompt="p", seed=3), parse_axis("Sampler=Euler a,Euler", "x"),
                       parse_axis("steps=1-2", "y"))
    text = xyz.grid_infotext("p\nSteps: 1, Seed: 3", planned)
    assert text.endswith('Script: X/Y/Z plot, X Type: Sampler, X Values: "Euler a,Euler", '
                         "Y Type: Steps, Y Values: 1-2")


# ----------------------------------------------------------------------------------------------- grid drawing

COLOURS = [(255, 0, 0), (0, 200, 0), (0, 0, 255), (200, 200, 0), (0, 200, 200), (200, 0, 200)]


def _solid(colour, size=(40, 30)):
    return Image.new("RGB", size, colour)


def _not_blank(region: Image.Image) -> bool:
    pixels = np.asarray(region.convert("L"))
    return bool((pixels < 128).any())


def test_grid_places_cells_and_draws_labels():
    cells = [_solid(c) for c in COLOURS]  # 3 columns x 2 rows
    grid, layout = draw_grid(cells, 3, ["col one", "col two", "col three"], ["row A", "row B"])
    assert layout.pad_left == 40 * 3 // 4 and layout.pad_top > 0 and layout.title_height == 0
    assert grid.size == (layout.pad_left + 3 * 40, layout.pad_top + 2 * 30)
    for index, colour in enumerate(COLOURS):
        left, top, right, bottom = layout.cell_box(index % 3, index // 3)
        patch = np.asarray(grid.crop((left, top, right, bottom)))
        assert (patch == colour).all(), (index, colour)
    # label bands: top band over each column and left band beside each row hold dark text; the corner is blank
    for column in range(3):
        left, _, right, _ = layout.cell_box(column, 0)
        assert _not_blank(grid.crop((left, 0, right, layout.pad_top)))
    for row in range(2):
        _, top, _, bottom = layout.cell_box(0, row)
        assert _not_blank(grid.crop((0, top, layout.pad_left, bottom)))
    assert not _not_blank(grid.crop((0, 0, layout.pad_left, layout.pad_top)))


def test_grid_without_labels_is_just_the_cells_and_title_goes_on_top():
    cells = [_solid(c) for c in COLOURS[:4]]
    plain, layout = draw_grid(cells, 2)
    assert plain.size == (80, 60) and layout.pad_left == layout.pad_top == 0
    assert np.asarray(plain.crop((40, 30, 80, 60)))[0, 0].tolist() == list(COLOURS[3])
    titled, layout = draw_grid(cells, 2, ["a", "b"], None, title="CFG Scale: 7")
    assert layout.pad_left == 0 and layout.title_height > 0 and layout.pad_top > layout.title_height
    assert _not_blank(titled.crop((0, 0, titled.width, layout.title_height)))
    assert _not_blank(titled.crop((0, layout.title_height, titled.width, layout.pad_top)))


def test_grid_with_margin_and_long_label_fits():
    cells = [_solid(c) for c in COLOURS[:2]]
    grid, layout = draw_grid(cells, 2, ["a very long label that must wrap onto lines", "b"], margin=6)
    assert layout.cell_box(1, 0)[0] == 40 + 6
    assert grid.width == 86
    assert (np.asarray(grid.crop(layout.cell_box(1, 0))) == COLOURS[1]).all()
    with pytest.raises(ValueError):
        draw_grid(cells, 3)


# ----------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("xyz")
    (root / "models").mkdir()
    return root


@pytest.fixture(scope="module")
def plotted(root):
    import torch

    from difusi.store import OutputStore

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with OutputStore(root / "outputs") as store:
            params = GenerationParams(prompt="a red circle on a blue background", seed=11, steps=1)
            result = xyz.xyz_plot(params, "sampler_name=Euler a,Euler", "steps=1,2", store=store,
                                  models_dir=root / "models")
    finally:
        torch.set_num_threads(threads)
    return result


def test_xyz_plot_makes_a_labelled_grid_and_saves_cells(plotted, root):
    assert len(plotted.grids) == 1 and len(plotted.cells) == 4 and plotted.z_grid is None
    cell_w, cell_h = plotted.cells[0].image.size
    grid = plotted.grids[0]
    assert grid.width == cell_w * 3 // 4 + 2 * cell_w and grid.height > 2 * cell_h
    assert [(c.x, c.y) for c in plotted.cells] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert [(c.params.sampler_name, c.params.steps) for c in plotted.cells] == [
        ("Euler a", 1), ("Euler", 1), ("Euler a", 2), ("Euler", 2)]
    # the bottom-right cell of the grid is the (Euler, 2 steps) image
    pad_top = grid.height - 2 * cell_h
    placed = grid.crop((grid.width - cell_w, pad_top + cell_h, grid.width, grid.height))
    assert np.array_equal(np.asarray(placed), np.asarray(plotted.cells[3].image.convert("RGB")))
    assert "Script: X/Y/Z plot" in plotted.infotext and plotted.infotext.startswith(plotted.cells[0].infotext)
    for cell in plotted.cells:
        assert len(cell.paths) == 1 and cell.paths[0].read_bytes() == cell.png
    path = xyz.save_grid(grid, plotted.infotext, root / "outputs")
    from difusi.infotext import read_infotext

    assert read_infotext(path) == plotted.infotext and "xyz-grids" in path.parts


def test_each_cell_equals_difusi_generate(plotted, root, monkeypatch, capsys):
    from difusi import cli

    monkeypatch.setenv("DIFUSI_OUTPUTS_DIR", str(root / "generate"))
    monkeypatch.setenv("DIFUSI_MODELS_DIR", str(root / "models"))
    monkeypatch.setenv("DIFUSI_CONFIG", str(root / "no-config.json"))
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for cell in plotted.cells:
            p = cell.params
            code = cli.main(["generate", p.prompt, "--seed", str(p.seed), "--steps", str(p.steps),
                             "--sampler", p.sampler_name])
            assert code == 0
            line = capsys.readouterr().out.strip().splitlines()[-1]
            made = Path(line.split("  seed=")[0])
            assert made.read_bytes() == cell.png, (p.sampler_name, p.steps)
    finally:
        torch.set_num_threads(threads)


def test_cells_on_a_ray_worker_are_the_same_bytes(plotted, root):
    pytest.importorskip("ray")
    import torch

    from difusi.batch.ray_runner import RayRunner

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the job's thread count (BatchJob.threads) is the driver's: the same as `plotted`
    runner = RayRunner(workers=1)
    try:
        params = GenerationParams(prompt="a red circle on a blue background", seed=11, steps=1)
        remote = xyz.xyz_plot(params, "sampler_name=Euler a,Euler", "steps=1,2", runner=runner,
                              models_dir=root / "models")
    finally:
        runner.close()
        torch.set_num_threads(threads)
    assert [cell.png for cell in remote.cells] == [cell.png for cell in plotted.cells]
    assert remote.grids[0].tobytes() == plotted.grids[0].tobytes()


def test_z_axis_makes_one_grid_per_value_and_a_grid_of_grids(root):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        params = GenerationParams(prompt="a red circle", seed=5, steps=1, width=64, height=64)
        result = xyz.xyz_plot(params, "cfg_scale=3,7", None, "Prompt S/R=red,green", models_dir=root / "models")
    finally:
        torch.set_num_threads(threads)
    assert len(result.grids) == 2 and result.z_grid is not None
    assert [c.params.prompt for c in result.cells] == ["a red circle"] * 2 + ["a green circle"] * 2
    assert result.z_grid.width >= sum(g.width for g in result.grids)
    assert "Z Type: Prompt S/R" in result.grid_infotexts[1]


class _FakeRunner:
    """A Runner that answers every job with one solid PNG (or an error for one row), in reverse order."""

    def __init__(self, fail_row=None):
        self.fail_row, self.jobs, self.closed = fail_row, [], False

    def run(self, jobs, models_dir):
        from difusi.batch.jobs import EncodedImage, JobOutput

        self.jobs = list(jobs)
        for job in reversed(self.jobs):  # runners answer in any order
            if job.row == self.fail_row:
                yield JobOutput(job.job_id, job.row, error="NumericalError: NaN in decoding")
                continue
            png = xyz.encode_png(_solid(COLOURS[job.row % len(COLOURS)], (64, 64)), f"cell {job.row}")
            yield JobOutput(job.job_id, job.row, [EncodedImage(0, job.params.seed, 0, png, f"cell {job.row}")])

    def close(self):
        self.closed = True


def test_cells_are_batch_jobs_and_results_are_placed_by_row():
    runner = _FakeRunner()
    result = xyz.xyz_plot(GenerationParams(prompt="p", seed=1, steps=1), "steps=1,2,3", "cfg_scale=3,7",
                          runner=runner)
    assert sorted(job.row for job in runner.jobs) == list(range(6)) and not runner.closed  # caller owns it
    assert len({job.job_id for job in runner.jobs}) == 6
    assert [job.params.steps for job in sorted(runner.jobs, key=lambda j: j.row)] == [1, 2, 3, 1, 2, 3]
    assert [c.infotext for c in result.cells] == [f"cell {n}" for n in range(6)]
    grid = result.grids[0]
    for cell in result.cells:  # each solid colour sits in its column/row of the drawn grid
        left = grid.width - (3 - cell.x) * 64
        top = grid.height - (2 - cell.y) * 64
        assert grid.getpixel((left + 32, top + 32)) == COLOURS[(cell.x + 3 * cell.y) % len(COLOURS)]


def test_a_failed_cell_names_the_cell():
    with pytest.raises(xyz.CellError, match=r"X=Steps: 2, Y=CFG Scale: 7 failed: NumericalError"):
        xyz.xyz_plot(GenerationParams(prompt="p", seed=1), "steps=1,2", "cfg_scale=3,7", runner=_FakeRunner(3))


# ----------------------------------------------------------------------------------------------- CLI


def test_cli_xyz_prints_grid_paths(root, monkeypatch, capsys):
    from difusi import cli

    monkeypatch.setenv("DIFUSI_OUTPUTS_DIR", str(root / "cli"))
    monkeypatch.setenv("DIFUSI_MODELS_DIR", str(root / "models"))
    monkeypatch.setenv("DIFUSI_CONFIG", str(root / "no-config.json"))
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = cli.main(["xyz", "a red circle", "--x", "steps=1,2", "--seed", "3", "--sampler", "Euler"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr()
    assert code == 0, out.err
    paths = [Path(line) for line in out.out.splitlines()]
    assert len(paths) == 1 and paths[0].is_file() and "xyz-grids" in paths[0].parts
    with Image.open(paths[0]) as grid:
        assert "Script: X/Y/Z plot" in grid.text["parameters"]


def test_cli_xyz_bad_axis_is_one_line_exit_2(root, capsys):
    from difusi import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["xyz", "a cat", "--x", "steps=0,5", "--outputs-dir", str(root / "bad")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == "difusi: error: --x: X axis (Steps): '0': must be in [1, 1000], got 0"


# ----------------------------------------------------------------------------------------------- HTTP mapping


def _script_args(x_type, x_values, y_type=0, y_values="", z_type=0, z_values="", lone=False, sub=False):
    # A1111 1.10's order: x_type, x_values, x_values_dropdown, y_type, y_values, y_values_dropdown, z_type,
    # z_values, z_values_dropdown, draw_legend, include_lone_images, include_sub_grids, no_fixed_seeds,
    # vary_seeds_x, vary_seeds_y, vary_seeds_z, margin_size, csv_mode
    return [x_type, x_values, [], y_type, y_values, [], z_type, z_values, [], True, lone, sub, False,
            False, False, False, 0, False]


def test_script_args_mapping():
    from difusi.batch.xyz import from_script_args

    spec = from_script_args(_script_args(9, "Euler a, Euler", 4, "1-2", 6, "3,7"), prompt="p")
    assert (spec.x.type.field, spec.x.values) == ("sampler_name", ("Euler a", "Euler"))
    assert (spec.y.type.field, spec.y.values) == ("steps", (1, 2))
    assert (spec.z.type.field, spec.z.values) == ("cfg_scale", (3.0, 7.0))
    assert spec.draw_legend and not spec.include_lone_images
    # dropdown values are used when the text is empty (A1111's non-CSV mode for choice axes)
    dropdown = from_script_args([9, "", ["Euler", "LMS"], 0, "", [], 0, "", [], True, True, False, False],
                                prompt="p")
    assert dropdown.x.values == ("Euler", "LMS") and dropdown.include_lone_images
    sr = from_script_args(_script_args(7, "cat,dog", 1, "1,2"), prompt="a cat")
    assert sr.x.type.kind == xyz.PROMPT_SR and sr.y.type.field == "seed"
    for bad in (_script_args(8, "10"), _script_args(99, "1"), ["x"], _script_args(4, "0")):  # 8: Prompt order
        with pytest.raises(AxisError) as raised:
            from_script_args(bad, prompt="p")
        assert raised.value.field == "script_args"


def test_png_bytes_decode():
    png = xyz.encode_png(_solid((1, 2, 3)), "text")
    with Image.open(io.BytesIO(png)) as image:
        assert image.text["parameters"] == "text"


def test_a1111_hires_denoising_and_vae_axes_set_their_fields():
    """A1111's "Hires steps", "Hires sampler", "Hires upscaler", "Denoising" and "VAE" axes are the hires-fix and
    sd_vae fields now (issue 15; issue 14 left the VAE axis out)."""
    from difusi.batch.xyz import parse_axis

    for text, field, values in (("Hires steps=2,3", "hr_second_pass_steps", (2, 3)),
                                ("Hires sampler=Euler,DPM++ 2M", "hr_sampler_name", ("Euler", "DPM++ 2M")),
                                ("Hires upscaler=Latent,Lanczos", "hr_upscaler", ("Latent", "Lanczos")),
                                ("Denoising=0.3,0.6", "denoising_strength", (0.3, 0.6)),
                                ("VAE=None,Automatic", "sd_vae", ("None", "Automatic"))):
        axis = parse_axis(text, "x")
        assert (axis.type.field, axis.values) == (field, values), text
    with pytest.raises(AxisError):
        parse_axis("Denoising=1.5", "x")
