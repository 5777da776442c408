"""``ImageDraw.Draw(image).point((x, y), fill=(r, g, b))``: channels truncated to integers, clipped to 0..255."""


class Draw:
    def __init__(self, image):
        self.image = image

    def point(self, xy, fill):
        self.image.pixels[tuple(xy)] = tuple(min(255, max(0, int(c))) for c in fill)
