// The entry point of attar's kernel library: onnxruntime calls RegisterCustomOps when a session
// registers the library (`kernels.py`), and every session shares one domain.
#include <exception>
#include <mutex>

#include "kernels.h"

extern "C" OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  static std::once_flag once;
  static Ort::CustomOpDomain* domain = nullptr;
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  try {
    std::call_once(once, [&] {
      attar::g_api = api;
      Ort::InitApi(api);
      domain = new Ort::CustomOpDomain("attar");
      attar::add_attention(*domain);
      attar::add_int8_rows(*domain);
      attar::add_int8_matmul(*domain);
      attar::add_norm(*domain);
      attar::add_top(*domain);
    });
    return api->AddCustomOpDomain(options, *domain);
  } catch (const std::exception& e) {
    return api ? api->CreateStatus(ORT_FAIL, e.what()) : nullptr;
  }
}
