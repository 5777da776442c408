"""A stand-in for the two corners of PIL that PyGmy uses, so its test needs no imaging library.

``Image.new``, ``ImageDraw.Draw(image).point`` and ``image.save``: the image is
saved as a binary PPM whatever the file name says, so the test compares the
pixels of the original's run and zpar's exactly.
"""
