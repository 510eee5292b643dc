//! CUDA executor (being written).
use crate::executor::ExecutorFactory;
pub struct CudaExecutorFactory;
impl CudaExecutorFactory {
    pub fn new(_ordinal: usize) -> Result<CudaExecutorFactory, String> {
        Err("no CUDA driver".into())
    }
}
impl ExecutorFactory for CudaExecutorFactory {
    fn device(&self) -> &crate::DeviceInfo {
        unreachable!()
    }
    fn create(&self) -> crate::executor::ExecResult<Box<dyn crate::Executor>> {
        unreachable!()
    }
}
pub fn sanity() -> Result<String, String> {
    Err("no CUDA driver".into())
}
