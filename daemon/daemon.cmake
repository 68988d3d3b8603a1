# fph::daemon: the vhost-user back end. The data path, in order:
#   session.cpp        one VM's vhost-user connection and protocol state
#   queue_service.cpp  validate chains, translate ranges, submit, return chains
#   ../reclaim         node pipelines (node_pipeline.cpp) and discard primitives (discard.cpp)
add_library(fph_daemon STATIC
  src/guest_memory.cpp
  src/session.cpp
  src/queue_service.cpp
  src/metrics.cpp
  src/server.cpp
  src/refault_sampler.cpp
  src/node_collector.cpp
  src/sampler.cpp
)
add_library(fph::daemon ALIAS fph_daemon)
target_include_directories(fph_daemon PUBLIC include)
target_compile_definitions(fph_daemon PRIVATE FPH_VERSION="${PROJECT_VERSION}")
target_link_libraries(fph_daemon PUBLIC fph::proto fph::reclaim prometheus-cpp::pull prometheus-cpp::core numa)

add_executable(fphd src/main.cpp)
target_link_libraries(fphd PRIVATE fph::daemon CLI11::CLI11)
install(TARGETS fphd RUNTIME DESTINATION bin)
