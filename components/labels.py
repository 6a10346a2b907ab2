"""How the pages name the search's settings (analysis.settings SEARCH_OBJECTIVES, SEARCH_SPACES, VERIFY_MODES),
shared by the Allocation page's search and the Compare page's sweep form."""
OBJECTIVE_LABELS = {"nll": "calibration loss", "kl": "KL to the dense model"}
SPACE_LABELS = {"block": "per block", "block+kind": "per block and matrix kind"}
VERIFY_LABELS = {"none": "nothing (fastest)", "starts": "the starts and the result", "all": "every improvement"}
