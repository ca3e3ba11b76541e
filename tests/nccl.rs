//! `NCCL_NVLS_ENABLE` is forced to 0 whatever the caller's environment says. One test in
//! its own binary: it changes the process environment, which is only safe while no
//! other thread reads it.

use shadowkv::cuda::nccl::disable_nvlink_multicast;

#[test]
fn nvlink_multicast_is_off_whatever_the_caller_set() {
    std::env::set_var("NCCL_NVLS_ENABLE", "1");
    disable_nvlink_multicast();
    assert_eq!(std::env::var("NCCL_NVLS_ENABLE").as_deref(), Ok("0"));
    std::env::remove_var("NCCL_NVLS_ENABLE");
    disable_nvlink_multicast();
    assert_eq!(std::env::var("NCCL_NVLS_ENABLE").as_deref(), Ok("0"));
}
