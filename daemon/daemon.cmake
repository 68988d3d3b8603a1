# fph::daemon: the vhost-user back end. The data path, in order:
#   session.cpp        one VM's vhost-user connection and protocol state
#   queue_service.cpp  validate chains, translate ranges, submit, return chains
#   ../reclaim         node pipelines (node_pipeline.cpp) and discard primitives (discard.cpp)
pkg_check_modules(SYSTEMD REQUIRED IMPORTED_TARGET libsystemd)
pkg_check_modules(TOMLPP REQUIRED IMPORTED_TARGET tomlplusplus)
add_library(fph_daemon STATIC
  src/guest_memory.cpp
  src/session.cpp
  src/queue_service.cpp
  src/metrics.cpp
  src/server.cpp
  src/refault_sampler.cpp
  src/node_collector.cpp
  src/sampler.cpp
  src/admin.cpp
  src/config.cpp
  src/systemd.cpp
  src/run.cpp
)
add_library(fph::daemon ALIAS fph_daemon)
target_include_directories(fph_daemon PUBLIC include)
target_compile_definitions(fph_daemon PRIVATE FPH_VERSION="${PROJECT_VERSION}")
target_link_libraries(fph_daemon PUBLIC fph::proto fph::reclaim prometheus-cpp::pull prometheus-cpp::core numa
  nlohmann_json::nlohmann_json PkgConfig::SYSTEMD PkgConfig::TOMLPP)

add_executable(fphd src/main.cpp)
target_link_libraries(fphd PRIVATE fph::daemon CLI11::CLI11)
install(TARGETS fphd RUNTIME DESTINATION bin)

# fphctl: the admin socket's command line client (and the small client
# library the integration tests use too).
add_library(fph_ctl_client STATIC fphctl/client.cpp)
target_include_directories(fph_ctl_client PUBLIC fphctl)
target_link_libraries(fph_ctl_client PUBLIC fph::common nlohmann_json::nlohmann_json)
add_executable(fphctl fphctl/main.cpp)
target_link_libraries(fphctl PRIVATE fph_ctl_client CLI11::CLI11)
install(TARGETS fphctl RUNTIME DESTINATION bin)

# systemd units, sysusers/tmpfiles snippets and the documented configuration.
install(FILES ${PROJECT_SOURCE_DIR}/systemd/fphd.service ${PROJECT_SOURCE_DIR}/systemd/fphd.socket
              ${PROJECT_SOURCE_DIR}/systemd/fphd-admin.socket DESTINATION lib/systemd/system)
install(FILES ${PROJECT_SOURCE_DIR}/systemd/fphd.sysusers DESTINATION lib/sysusers.d RENAME fphd.conf)
install(FILES ${PROJECT_SOURCE_DIR}/systemd/fphd.tmpfiles DESTINATION lib/tmpfiles.d RENAME fphd.conf)
install(FILES ${PROJECT_SOURCE_DIR}/etc/fphd.toml DESTINATION share/fph)
