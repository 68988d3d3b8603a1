# fph::daemon: the vhost-user back end. The folders under src/ are its layers,
# and the data path reads top to bottom:
#   vhost_user/  the protocol: server.cpp (sockets, one thread per VM),
#                session.cpp (one VM's connection, memory table, rings),
#                backend_channel.cpp (back end -> front end requests),
#                guest_memory.cpp (mapped regions, address translation),
#                memory_guard.cpp (a shrunk guest file never SIGBUSes fphd),
#                vring.cpp (the ring rules: where a ring may be, what a
#                refused configuration takes away)
#   balloon/     the virtio-balloon device: queue_service.cpp (validate chains,
#                translate ranges, submit, return chains), stats_service.cpp
#                (the stats queue: parse and hold the driver's stats buffer),
#                the reclaim state and refault samplers
#   migration/   live migration: dirty_log.cpp (the shared dirty bitmap),
#                state_transfer.cpp (the SAVE/LOAD pipe), session_migration.cpp
#                (the session's migration messages)
#   ../reclaim   node pipelines (node_pipeline.cpp) and discard primitives (discard.cpp)
#   ops/         operating it: metrics, admin socket, config, systemd, run(),
#                heap_trim.cpp (freed heap back to the kernel after bursts)
pkg_check_modules(SYSTEMD REQUIRED IMPORTED_TARGET libsystemd)
pkg_check_modules(TOMLPP REQUIRED IMPORTED_TARGET tomlplusplus)
add_library(fph_daemon STATIC
  src/vhost_user/server.cpp
  src/vhost_user/session.cpp
  src/vhost_user/backend_channel.cpp
  src/vhost_user/guest_memory.cpp
  src/vhost_user/memory_guard.cpp
  src/vhost_user/vring.cpp
  src/balloon/queue_service.cpp
  src/balloon/stats_service.cpp
  src/balloon/refault_sampler.cpp
  src/balloon/balloon_targets.cpp
  src/balloon/vm_policy.cpp
  src/balloon/refault_backoff.cpp
  src/balloon/sampler.cpp
  src/migration/dirty_log.cpp
  src/migration/state_transfer.cpp
  src/migration/session_migration.cpp
  src/ops/metrics.cpp
  src/ops/node_collector.cpp
  src/ops/heap_trim.cpp
  src/ops/admin.cpp
  src/ops/config.cpp
  src/ops/systemd.cpp
  src/ops/run.cpp
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
