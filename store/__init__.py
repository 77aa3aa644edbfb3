import warnings

# The delta filter comes from numcodecs; zarr warns that it is outside the v3 spec on every use.
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3")
