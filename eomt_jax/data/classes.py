"""Class lists of the supported datasets: names, the maps from on-disk ids to contiguous labels, stuff lists.

Contiguous labels are what the model predicts (class-head index). The maps follow the original EoMT data
modules exactly, so checkpoints converted from PyTorch predict the same label for the same class.
"""

# COCO panoptic category ids in contiguous-label order: 80 things (labels 0-79), then 53 stuff (80-132).
COCO_THING_IDS = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31, 32,
    33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59,
    60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90,
)
COCO_STUFF_IDS = (
    92, 93, 95, 100, 107, 109, 112, 118, 119, 122, 125, 128, 130, 133, 138, 141, 144, 145, 147, 148, 149,
    151, 154, 155, 156, 159, 161, 166, 168, 171, 175, 176, 177, 178, 180, 181, 184, 185, 186, 187, 188, 189,
    190, 191, 192, 193, 194, 195, 196, 197, 198, 199, 200,
)
COCO_PANOPTIC_IDS = COCO_THING_IDS + COCO_STUFF_IDS
COCO_PANOPTIC_ID_TO_LABEL = {cat: i for i, cat in enumerate(COCO_PANOPTIC_IDS)}
# COCO instance segmentation uses only the things, which keep the same labels 0-79.
COCO_INSTANCE_ID_TO_LABEL = {cat: i for i, cat in enumerate(COCO_THING_IDS)}

COCO_THING_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)
COCO_STUFF_NAMES = (
    "banner", "blanket", "bridge", "cardboard", "counter", "curtain", "door-stuff", "floor-wood", "flower",
    "fruit", "gravel", "house", "light", "mirror-stuff", "net", "pillow", "platform", "playingfield",
    "railroad", "river", "road", "roof", "sand", "sea", "shelf", "snow", "stairs", "tent", "towel",
    "wall-brick", "wall-stone", "wall-tile", "wall-wood", "water-other", "window-blind", "window-other",
    "tree-merged", "fence-merged", "ceiling-merged", "sky-other-merged", "cabinet-merged", "table-merged",
    "floor-other-merged", "pavement-merged", "mountain-merged", "grass-merged", "dirt-merged", "paper-merged",
    "food-other-merged", "building-other-merged", "rock-merged", "wall-other-merged", "rug-merged",
)
COCO_PANOPTIC_NAMES = COCO_THING_NAMES + COCO_STUFF_NAMES
COCO_PANOPTIC_STUFF = tuple(range(80, 133))

ADE20K_NAMES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence",
    "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column",
    "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator",
    "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway",
    "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier", "awning",
    "streetlight", "booth", "television receiver", "airplane", "dirt track", "apparel", "pole", "land",
    "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain",
    "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket",
    "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name",
    "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood",
    "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)
# Labels treated as stuff by the ADE20K panoptic configs; every other label is a thing.
ADE20K_PANOPTIC_STUFF = (
    0, 1, 2, 3, 4, 5, 6, 9, 11, 13, 16, 17, 21, 25, 26, 28, 29, 34, 40, 46, 48, 51, 52, 54, 59, 60, 61, 63,
    68, 77, 79, 84, 91, 94, 96, 99, 100, 101, 105, 106, 109, 113, 114, 117, 122, 128, 131, 140, 141, 145,
)
# Instance PNG category (red channel - 1, 0-99) -> 150-class label.
ADE20K_INSTANCE_TO_LABEL = (
    7, 8, 10, 12, 14, 15, 18, 19, 20, 22, 23, 24, 27, 30, 31, 32, 33, 35, 36, 37, 38, 39, 41, 42, 43, 44,
    45, 47, 49, 50, 53, 55, 56, 57, 58, 62, 64, 65, 66, 67, 69, 70, 71, 72, 73, 74, 75, 76, 78, 80, 81, 82,
    83, 85, 86, 87, 88, 89, 90, 92, 93, 95, 97, 98, 102, 103, 104, 107, 108, 110, 111, 112, 115, 116, 118,
    119, 120, 121, 123, 124, 125, 126, 127, 129, 130, 132, 133, 134, 135, 136, 137, 138, 139, 142, 143, 144,
    146, 147, 148, 149,
)

# Cityscapes gtFine labelId -> train id (the 19 evaluated classes); every other labelId is ignored.
CITYSCAPES_ID_TO_LABEL = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13,
    27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}
CITYSCAPES_NAMES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)

assert len(COCO_PANOPTIC_IDS) == len(COCO_PANOPTIC_NAMES) == 133
assert len(ADE20K_NAMES) == 150 and len(ADE20K_INSTANCE_TO_LABEL) == 100 and len(ADE20K_PANOPTIC_STUFF) == 50
assert sorted(ADE20K_INSTANCE_TO_LABEL + ADE20K_PANOPTIC_STUFF) == list(range(150))
assert len(CITYSCAPES_NAMES) == 19


# The dataset settings of the original's configs: (class names, stuff class indices).
DATASETS = {
    "coco_panoptic": (COCO_PANOPTIC_NAMES, COCO_PANOPTIC_STUFF),
    "coco_instance": (COCO_THING_NAMES, ()),
    "ade20k_panoptic": (ADE20K_NAMES, ADE20K_PANOPTIC_STUFF),
    "ade20k_semantic": (ADE20K_NAMES, tuple(range(150))),
    "cityscapes_semantic": (CITYSCAPES_NAMES, tuple(range(19))),
}


def dataset_classes(name: str) -> tuple[list[str], list[int]]:
    """(class names, stuff labels) of a dataset setting, as stored with converted weights (`--dataset`)."""
    if name not in DATASETS:
        raise ValueError(f"--dataset must be one of {sorted(DATASETS)}, got {name!r}")
    names, stuff = DATASETS[name]
    return list(names), list(stuff)
