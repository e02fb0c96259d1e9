// mha — multi-head attention on Eigen. The umbrella header: include this one.
#pragma once

#include <mha/attention.hpp>
#include <mha/config.hpp>
#include <mha/decode_weights.hpp>
#include <mha/error.hpp>
#include <mha/kv_cache.hpp>
#include <mha/mask.hpp>
#include <mha/multi_head_attention.hpp>
#include <mha/parameters.hpp>
#include <mha/rotary.hpp>
#include <mha/softmax.hpp>
#include <mha/tape.hpp>
#include <mha/threads.hpp>
