"""Drawing of X/Y/Z plot grids in A1111's layout (`modules/images.py` `image_grid` + `draw_grid_annotations`).

Layout, as A1111 draws it: cells side by side in row-major order on a white canvas; the column (X) labels in a
band above the cells, one centred over each column; the row (Y) labels in a band to the left, three quarters of
a cell wide, one centred beside each row; no band where an axis has no labels. The font size is (cell width +
cell height) // 25 (at least 12 px) and shrinks until a label fits its band; words wrap first. A Z value is a title band above
its grid (A1111 writes the Z labels over the columns of its grid of grids, which `grid_of_grids` also makes).

The font is Pillow's own scalable default (`ImageFont.load_default(size=...)`, Pillow >= 10.1), so grids are
drawn the same on every machine, offline, with no font file to find.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
TEXT_COLOUR = (0, 0, 0)
MIN_FONT_SIZE = 12


@dataclass(frozen=True)
class GridLayout:
    """Where everything went: tests and callers read cell positions from here instead of recomputing them."""

    cell_width: int
    cell_height: int
    columns: int
    rows: int
    pad_left: int
    """Width of the row-label band (0 without row labels)."""
    pad_top: int
    """Height of the column-label band plus the title band (0 without either)."""
    title_height: int
    """Height of the title band at the very top (0 without a title); the column labels sit below it."""
    margin: int

    def cell_box(self, column: int, row: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of one cell in the finished grid."""
        left = self.pad_left + (self.cell_width + self.margin) * column
        top = self.pad_top + (self.cell_height + self.margin) * row
        return left, top, left + self.cell_width, top + self.cell_height


def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled scalable font at `size` pixels (no font file needed)."""
    return ImageFont.load_default(size=max(1, size))


def _text_size(draw: ImageDraw.ImageDraw, text: str, face: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> tuple[int, int]:
    if not text:
        return 0, 0
    left, top, right, bottom = draw.multiline_textbbox((0, 0), text, font=face)
    return int(right - left), int(bottom - top)


def _wrap(draw: ImageDraw.ImageDraw, text: str, face: ImageFont.FreeTypeFont | ImageFont.ImageFont,
          width: int) -> list[str]:
    """Greedy word wrap to `width` pixels (A1111's `wrap`); a single long word stays whole and is shrunk later."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        current = ""
        for word in paragraph.split(" "):
            candidate = f"{current} {word}" if current else word
            if current and _text_size(draw, candidate, face)[0] > width:
                lines.append(current)
                current = word
            else:
                current = candidate
        lines.append(current)
    return lines


@dataclass
class _Label:
    lines: list[str]
    sizes: list[tuple[int, int]]
    height: int


def _measure(draw: ImageDraw.ImageDraw, text: str, face: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: int,
             spacing: int) -> _Label:
    lines = _wrap(draw, text, face, width) if text else []
    sizes = [_text_size(draw, line, face) for line in lines]
    height = sum(h for _, h in sizes) + spacing * max(0, len(lines) - 1)
    return _Label(lines, sizes, height)


def _draw_label(draw: ImageDraw.ImageDraw, label: _Label, centre_x: float, top: float, width: int, size: int,
                spacing: int) -> None:
    """Each line centred on `centre_x`, shrunk until it fits `width` (A1111 shrinks the font, never clips)."""
    y = top
    for line, (_, height) in zip(label.lines, label.sizes, strict=True):
        fitted, face = size, font(size)
        while fitted > 1 and _text_size(draw, line, face)[0] > width:
            fitted -= 1
            face = font(fitted)
        draw.text((centre_x, y + height / 2), line, font=face, fill=TEXT_COLOUR, anchor="mm")
        y += height + spacing


def draw_grid(cells: Sequence[Image.Image], columns: int, column_labels: Sequence[str] | None = None,
              row_labels: Sequence[str] | None = None, title: str | None = None, margin: int = 0,
              ) -> tuple[Image.Image, GridLayout]:
    """Cells in row-major order (X fastest), `columns` per row, annotated in A1111's layout; returns the image and
    where each part went. Every cell is drawn at the first cell's size (A1111 sizes the grid from it)."""
    if not cells:
        raise ValueError("a grid needs at least one cell")
    if len(cells) % columns:
        raise ValueError(f"{len(cells)} cells do not fill {columns} columns")
    rows = len(cells) // columns
    width, height = cells[0].size
    column_labels = list(column_labels or [])
    row_labels = list(row_labels or [])
    has_columns = any(column_labels)
    has_rows = any(row_labels)
    if has_columns and len(column_labels) != columns:
        raise ValueError(f"{len(column_labels)} column labels for {columns} columns")
    if has_rows and len(row_labels) != rows:
        raise ValueError(f"{len(row_labels)} row labels for {rows} rows")

    # A1111's font size rule, (w + h) // 25, but at least MIN_FONT_SIZE: at difusi-mini's 64 px A1111's rule gives
    # 5 px text nobody can read; labels that do not fit still shrink (and wrap) as A1111's do.
    size = max(MIN_FONT_SIZE, (width + height) // 25)
    spacing = max(1, size // 2)
    face = font(size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    pad_left = width * 3 // 4 if has_rows else 0
    tops = [_measure(probe, text, face, width, spacing) for text in column_labels] if has_columns else []
    lefts = [_measure(probe, text, face, pad_left, spacing) for text in row_labels] if has_rows else []
    grid_width = pad_left + width * columns + margin * (columns - 1)
    heading = _measure(probe, title, face, grid_width, spacing) if title else None
    title_height = heading.height + spacing * 2 if heading is not None else 0
    label_band = max(label.height for label in tops) + spacing * 2 if tops else 0
    pad_top = title_height + label_band
    layout = GridLayout(width, height, columns, rows, pad_left, pad_top, title_height, margin)

    canvas = Image.new("RGB", (grid_width, pad_top + height * rows + margin * (rows - 1)), BACKGROUND)
    for index, cell in enumerate(cells):
        column, row = index % columns, index // columns
        picture = cell if cell.size == (width, height) else cell.resize((width, height))
        canvas.paste(picture.convert("RGB"), layout.cell_box(column, row)[:2])
    draw = ImageDraw.Draw(canvas)
    if heading is not None:
        _draw_label(draw, heading, grid_width / 2, spacing, grid_width, size, spacing)
    for column, label in enumerate(tops):
        left = layout.cell_box(column, 0)[0]
        _draw_label(draw, label, left + width / 2, title_height + label_band / 2 - label.height / 2, width, size,
                    spacing)
    for row, label in enumerate(lefts):
        top = layout.cell_box(0, row)[1]
        _draw_label(draw, label, pad_left / 2, top + height / 2 - label.height / 2, pad_left, size, spacing)
    return canvas, layout


def grid_of_grids(grids: Sequence[Image.Image], labels: Sequence[str], margin: int = 0) -> Image.Image:
    """A1111's Z grid: the per-Z grids side by side with the Z labels over them (smaller ones padded white)."""
    width = max(grid.width for grid in grids)
    height = max(grid.height for grid in grids)
    padded = []
    for grid in grids:
        if grid.size != (width, height):
            canvas = Image.new("RGB", (width, height), BACKGROUND)
            canvas.paste(grid, (0, 0))
            grid = canvas
        padded.append(grid)
    image, _ = draw_grid(padded, columns=len(padded), column_labels=list(labels), margin=margin)
    return image
