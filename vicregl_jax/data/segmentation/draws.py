"""The uniform draws of one segmentation training example, by position in its vector.

One vector of NUM_DRAWS uniform numbers, drawn from the example's position, holds every random
decision of its augmentation: the rescale ratio, 11 candidate crop windows (rows and columns),
the flip, and the photometric distortion's steps and amounts.
"""

RATIO, CROP_Y, CROP_X = 0, 1, 12  # 11 crop candidates each
FLIP, BRIGHT, BRIGHT_DELTA, CONTRAST_LAST = 23, 24, 25, 26
CONTRAST, CONTRAST_ALPHA, SATURATE, SATURATE_ALPHA, HUE, HUE_DELTA = 27, 28, 29, 30, 31, 32
NUM_DRAWS = 33
