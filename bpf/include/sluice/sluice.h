/* sluice/sluice.h: the whole shared BPF library in one include. */
#ifndef SLUICE_H
#define SLUICE_H
#include <sluice/common.h>
#include <sluice/maps.h>
#include <sluice/parse.h>
#include <sluice/trace.h>
#endif
