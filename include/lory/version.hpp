// lory: the library's version, the one number for the C++ package (CMake reads it for
// project(VERSION)) and the Python package (setup.py reads it).
#pragma once

#define LORY_VERSION_MAJOR 0
#define LORY_VERSION_MINOR 1
#define LORY_VERSION_PATCH 0
// MAJOR * 10000 + MINOR * 100 + PATCH, for preprocessor comparisons.
#define LORY_VERSION (LORY_VERSION_MAJOR * 10000 + LORY_VERSION_MINOR * 100 + LORY_VERSION_PATCH)
